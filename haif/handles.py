"""The transport of the calls between HAIF's Serve deployments."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig


def transported(handle: DeploymentHandle, config: HaifConfig) -> DeploymentHandle:
    """``handle`` over ``server.handle_transport``: Ray actor calls (``ray``, objects by
    reference through Ray's object store) or Serve's gRPC channel straight to the replica
    (``grpc``, arguments and results by value)."""
    if config.server.handle_transport == "grpc":
        return handle.options(_by_reference=False)
    return handle
