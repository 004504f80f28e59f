"""The `haif` operator CLI."""
