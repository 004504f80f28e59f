"""HAIF gateway."""
