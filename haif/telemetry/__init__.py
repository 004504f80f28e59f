"""Telemetry: traces, metrics and JSON logs."""
