"""HAIF bridge."""
