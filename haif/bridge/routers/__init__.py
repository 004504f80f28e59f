"""Thin HTTP routers: parse, hand over to ``BridgeService``, nothing else."""
