"""HAIF sdk."""
