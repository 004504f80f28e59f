"""Ray actors of HAIF: the model workers the Orchestrator creates and owns."""
