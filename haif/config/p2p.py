"""The P2P shim: the Node sidecar on hyperdht that serves and calls Hyperswarm RPC peers."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from haif.config._base import ConfigModel

# One message on a Hyperswarm secret stream is at most 16 MiB - 1 (an atomic write); the
# bound leaves room for protomux's and protomux-rpc's headers.
P2P_MAX_MESSAGE_BYTES = 15 * 1024**2
_HOST_PORT = r"^[^\s:]+:\d{1,5}$"
_LOOPBACK = ("127.", "localhost:")


class P2PConfig(ConfigModel):
    enabled: bool = Field(False, description="Run the P2P shim (the Node sidecar on hyperdht).")
    bootstrap: list[str] | None = Field(
        None, min_length=1, max_length=64,
        description="DHT bootstrap nodes, `host:port` each; unset: the public DHT.",
    )
    host: str | None = Field(
        None, min_length=1, max_length=255,
        description="Address the DHT node binds; unset: 127.0.0.1 when every bootstrap node is "
        "on the loopback (a local testnet), else 0.0.0.0.",
    )
    seed_file: str | None = Field(
        None, description="File of the 32-byte key seed, created on first start; unset: "
        "`p2p/seed` in server.state_dir (the public key is stable across restarts).",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Deadline of one P2P request (a peer's haif.timeout_s may shorten it)."
    )
    max_concurrent: int = Field(
        256, ge=1, le=100_000, description="Requests the sidecar serves at once (OVERLOADED beyond), and calls it makes."
    )
    max_message_bytes: int = Field(
        4 * 1024**2, ge=1024, le=P2P_MAX_MESSAGE_BYTES,
        description="Largest request or answer value (INVALID_REQUEST beyond); at most 15 MiB.",
    )
    max_concurrent_unverified: int = Field(
        32, ge=1, le=100_000,
        description="Requests from keys HAIF has not served yet (strangers, a peer's first request) "
        "handed to HAIF at once; more wait for a slot within their deadline, up to max_concurrent "
        "waiting (OVERLOADED beyond): a flood of unknown keys never takes served peers' slots.",
    )
    max_connections: int = Field(
        1024, ge=1, le=100_000,
        description="Peer connections the sidecar keeps open, inbound and outbound each; past it a new "
        "inbound connection closes the oldest idle one (a stranger's first).",
    )
    max_stream_buffer_bytes: int = Field(
        256 * 1024, ge=1024, le=P2P_MAX_MESSAGE_BYTES,
        description="Bytes of a stream's chunks handed to the sidecar that its peer has not taken yet; "
        "beyond it HAIF waits for the peer before it reads the stream on (a larger chunk goes alone).",
    )
    peers: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]] = Field(
        default_factory=dict, max_length=100_000,
        description="Peer public key (64 hex) -> tenant name, besides `haif p2p peers add`.",
    )
    node: str = Field("node", min_length=1, description="The Node.js (20+) executable that runs the sidecar.")
    restart_backoff_initial_s: float = Field(
        0.5, gt=0, le=60, description="Wait before restarting a sidecar that died (doubles per death)."
    )
    restart_backoff_max_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait before restarting a sidecar that keeps dying."
    )

    @field_validator("peers", mode="before")
    @classmethod
    def _lower_case_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k.strip().lower() if isinstance(k, str) else k: v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> P2PConfig:
        for node in self.bootstrap or ():
            if not re.match(_HOST_PORT, node) or not 1 <= int(node.rsplit(":", 1)[1]) <= 65535:
                raise ValueError(f"p2p.bootstrap: {node!r} is not host:port")
        bad = [key for key in self.peers if not re.match(r"^[0-9a-f]{64}$", key)]
        if bad:
            raise ValueError(f"p2p.peers: keys are 64 hex characters, not {bad[0][:80]!r}")
        if self.restart_backoff_initial_s > self.restart_backoff_max_s:
            raise ValueError("p2p.restart_backoff_initial_s exceeds p2p.restart_backoff_max_s")
        return self

    def bind_host(self) -> str:
        """The address the DHT node binds (``host``, or the default it stands for)."""
        if self.host is not None:
            return self.host
        if self.bootstrap and all(node.startswith(_LOOPBACK) for node in self.bootstrap):
            return "127.0.0.1"
        return "0.0.0.0"
