"""The P2P shim: a Ray Serve deployment whose replica runs the Node sidecar under supervision.

The replica starts the sidecar (``haif.p2p.Sidecar``: the real @hyperswarm/rpc on
hyperdht), restarts it whenever it dies, and answers every peer's request through the
Gateway deployment (``haif.p2p.inbound.GatewayInbound``): the same admission, quotas,
records and trace as an HTTP request. ``status`` reports the sidecar's state for
``/readyz`` (``p2p``: degraded while it is down) and ``haif p2p info``.

It is also the way out to remote P2P workers (a model's ``p2p_workers``): the Orchestrator
probes them through ``worker_health`` and the Gateway's router sends them work through
``worker_call`` / ``worker_stream``; their errors come back as ``Refused`` values, as the
Gateway's own do, so that Serve logs no traceback for a peer's refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from haif.envelope import Refused
from haif.exceptions import HaifError
from haif.p2p.inbound import GatewayInbound
from haif.p2p.sidecar import Sidecar, SidecarState
from haif.p2p.wire import decode_embedding, decode_event, decode_outputs, encode_item
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.envelope import WorkItem

logger = logging.getLogger("haif.p2p")

WORKER_HEALTH_TIMEOUT_S = 5.0


async def _body(item: WorkItem) -> Any:
    return await item.body if item.by_reference else item.body


class P2PShim:
    def __init__(self, config: HaifConfig) -> None:
        from ray import serve

        context = serve.get_replica_context()
        tracing.setup_tracing(
            config.telemetry, "p2p", region=config.regions[0].name, instance=context.replica_id.unique_id
        )
        install_json_logs(config.telemetry, "p2p")
        self._config = config
        gateway = serve.get_deployment_handle("Gateway", app_name=context.app_name)
        self._sidecar = Sidecar.from_config(config, GatewayInbound(config, gateway))
        self._starting: asyncio.Task[None] | None = None
        self._error: str | None = None
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._starting is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the loop: the first call starts it
        self._starting = loop.create_task(self._start())

    async def _start(self) -> None:
        try:
            await self._sidecar.start()
        except Exception as exc:  # a missing Node or npm install: reported, not retried
            self._error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            logger.error("the P2P sidecar cannot start: %s", self._error)

    async def check_health(self) -> None:
        """Serve's periodic check; the sidecar's own supervisor restarts it when it dies."""
        self._ensure_started()

    async def status(self) -> dict[str, Any]:
        """The sidecar's state, key, bootstrap and connected peers (``ok`` only while up)."""
        self._ensure_started()
        status = self._sidecar.status()
        return {
            "state": "ok" if status.state is SidecarState.UP else f"degraded: {status.state.value}",
            "sidecar": status.state.value,
            "public_key": status.public_key,
            "listening_key": status.listening_key,
            "bootstrap": self._config.p2p.bootstrap,
            "host": self._config.p2p.bind_host(),
            "inbound_peers": status.inbound_peers,
            "outbound_peers": status.outbound_peers,
            "inbound_in_flight": status.inbound_in_flight,
            "outbound_in_flight": status.outbound_in_flight,
            "restarts": status.restarts,
            "pid": status.pid,
            "error": self._error or status.last_error,
        }

    # --- remote P2P workers (the Gateway's router calls these) ------------------------------

    async def worker_health(self, peer: str) -> dict[str, Any] | Refused:
        """``haif.worker.health`` of a remote worker: ``{"state", "in_flight", "model"}``."""
        try:
            return await self._sidecar.call(peer, "haif.worker.health", {}, timeout_s=WORKER_HEALTH_TIMEOUT_S)
        except HaifError as exc:
            return Refused(exc)

    async def worker_call(self, peer: str, item: WorkItem) -> Any:
        """``haif.worker.infer`` of a unary work item: its outputs or embedding result."""
        try:
            value = encode_item(item, await _body(item))
            answer = await self._sidecar.call(peer, "haif.worker.infer", value, timeout_s=item.ctx.remaining_s())
            if item.kind == "embedding":
                return decode_embedding(answer)
            return decode_outputs(answer)
        except HaifError as exc:
            return Refused(exc)

    async def worker_stream(self, peer: str, item: WorkItem) -> AsyncIterator[Any]:
        """``haif.worker.infer`` of a streamed work item: its events (a failure: ``Refused``, last)."""
        try:
            value = {**encode_item(item, await _body(item)), "haif": {"request_id": item.ctx.request_id}}
            chunks = self._sidecar.stream(peer, "haif.worker.infer", value, timeout_s=item.ctx.remaining_s())
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if isinstance(chunk, dict) and "text" in chunk:  # the last item is the summary
                        yield decode_event(chunk)
        except HaifError as exc:
            yield Refused(exc)

    async def __del__(self) -> None:
        """Serve stops the replica: the sidecar stops with it."""
        await self._sidecar.stop()
