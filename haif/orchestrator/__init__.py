"""HAIF orchestrator."""
