"""The reference remote P2P worker: one of HAIF's runtimes behind a sidecar, outside Ray.

``haif p2p worker --model NAME`` loads the model as a worker actor would (pulled from the
artifact store and verified, or from its path), starts a sidecar that serves
``haif.worker.infer`` and ``haif.worker.health`` (values: ``haif.p2p.wire``), and prints
its public key: listed in a model's ``p2p_workers``, the machine is capacity of the
cluster's Gateways, whatever network it is on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haif.exceptions import AuthenticationFailed, ConfigError, InvalidRequest, ModelNotFound
from haif.p2p.handler import WORKER_METHODS
from haif.p2p.wire import decode_item, encode_embedding, encode_event, encode_outputs

if TYPE_CHECKING:
    from haif.config import HaifConfig
    from haif.envelope import WorkItem

logger = logging.getLogger("haif.p2p")

NO_OBJECT_REFS = 1 << 62  # outside Ray every result travels by value


class RemoteWorker:
    """Answers ``haif.worker.*`` for one model of ``config``.

    Args:
        allow: the peers (public keys) it serves, e.g. the HAIF shim's; empty: any peer.
    """

    def __init__(self, config: HaifConfig, model_name: str, allow: frozenset[str] = frozenset()) -> None:
        from actors.worker import ModelWorker

        model = config.model(model_name)
        if model is None:
            raise ConfigError(f"the config has no model {model_name!r}")
        self.model = model
        self._allow = frozenset(k.lower() for k in allow)
        # Tracing and logs are the process's (serve_worker sets them up), not the worker's.
        self._worker = ModelWorker(
            model, config.limits.max_prompt_tokens, str(config.base_path()), f"{model.name}/p2p", config.artifacts
        )

    async def load(self) -> dict[str, Any]:
        return await self._worker.load(NO_OBJECT_REFS)

    async def __call__(self, method: str, peer: str, value: dict[str, Any]) -> Any:
        if self._allow and peer.lower() not in self._allow:
            raise AuthenticationFailed("this P2P worker serves the HAIF deployments it is registered with only")
        if method == "haif.worker.health":
            state, in_flight, adapters = self._worker.ping()
            return {"state": state, "in_flight": in_flight, "model": self.model.name, "adapters": adapters}
        if method != "haif.worker.infer":
            raise InvalidRequest(f"unknown method {method!r}")
        item = decode_item(value)
        if item.model != self.model.name:
            raise ModelNotFound(f"this P2P worker serves {self.model.name!r}, not {item.model!r}")
        if item.kind == "embedding":
            result = await self._worker.embed(item)
            return encode_embedding(result, result.vectors)
        if item.stream:
            return self._stream(item)
        return encode_outputs(await self._worker.generate(item))

    async def _stream(self, item: WorkItem) -> AsyncIterator[dict[str, Any]]:
        async for event in self._worker.generate_stream(item):
            yield encode_event(event)


def worker_seed_path(config: HaifConfig, model_name: str) -> Path:
    """A worker's own key seed (not the shim's: both may run on one machine)."""
    return config.state_path() / "p2p" / f"worker-{model_name.replace('/', '_')}.seed"


async def serve_worker(
    config: HaifConfig, model_name: str, allow: frozenset[str], stop: asyncio.Event, seed_file: Path | None = None
) -> None:
    """Load the model, start the sidecar, print its key, serve until ``stop`` is set."""
    from haif.p2p.sidecar import Sidecar
    from haif.telemetry import tracing
    from haif.telemetry.logs import install_json_logs

    tracing.setup_tracing(config.telemetry, "worker", instance=f"{model_name}/p2p")
    install_json_logs(config.telemetry, "worker")
    worker = RemoteWorker(config, model_name, allow)
    await worker.load()
    sidecar = Sidecar(
        config.p2p,
        seed_file=seed_file or worker_seed_path(config, model_name),
        runtime_dir=config.state_path() / "p2p",
        handler=worker,
        methods=WORKER_METHODS,
    )
    await sidecar.start()
    try:
        if not await sidecar.wait_up(60):
            raise ConfigError(f"the P2P sidecar did not come up: {sidecar.status().last_error}")
        print(f"public key: {sidecar.public_key}", flush=True)
        print(f"serving model {model_name} over P2P", flush=True)
        await stop.wait()
    finally:
        await sidecar.stop()
