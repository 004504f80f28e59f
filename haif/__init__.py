"""HAIF: a distributed, OpenAI-compatible AI inference network on Ray Serve."""

__version__ = "0.1.0"

__all__ = ["__version__"]
