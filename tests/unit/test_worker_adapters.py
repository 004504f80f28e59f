"""A worker's LoRA adapters (actors.adapters) over the torch runtime and a signed store:
pulled, verified and loaded on first use, ``max_adapters_per_worker`` of them (the least
recently used one evicted), never one in use; a refused adapter loads nothing and the
base keeps serving; loads, evictions and hits are counted per model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.adapters import WorkerAdapters
from haif.artifacts import ArtifactLoader, ArtifactRef, NodeCache, TrustPolicy, pull
from haif.config import ModelConfig
from haif.envelope import Adapter
from haif.exceptions import AdapterNotFound, AdapterRejected
from haif.runtimes.base import RuntimeContext, SamplingParams
from haif.runtimes.torch import TorchRuntime
from haif.telemetry.metrics import ProcessMetrics, WorkerMetrics
from tests.support.lora_cases import BASE, ROGUE, WRONG_BASE, LoraStore

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
A, B, C = (Adapter(n, f"{n}:1") for n in ("lora-a", "lora-b", "lora-c"))


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> LoraStore:
    return LoraStore.build(tmp_path_factory.mktemp("worker-lora"))


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _model(**changes: Any) -> ModelConfig:
    data: dict[str, Any] = {
        "name": "tiny-llama", "runtime": "torch", "artifact": BASE, "max_adapters_per_worker": 2,
        "adapters": [{"name": a.name, "artifact": a.artifact} for a in (A, B, C)],
        "torch": {"max_batch_size": 8, "max_wait_ms": 20},
    }
    return ModelConfig.model_validate({**data, **changes})


class Worker:
    """What the worker actor holds for one loaded base: its runtime and its adapters."""

    def __init__(self, lora: LoraStore, tmp: Path, loop: asyncio.AbstractEventLoop, **model: Any) -> None:
        config = lora.config(cache_dir=str(tmp / "cache"))
        self.loop = loop
        self.pulled = pull(lora.store(), NodeCache.from_config(config), ArtifactRef.parse(BASE),
                           TrustPolicy(global_keys=(lora.key.public_key,)))
        self.config = _model(**model)
        self.runtime = TorchRuntime(RuntimeContext(model=self.config, model_dir=str(self.pulled.path),
                                                   device="cpu", max_prompt_tokens=512))
        loop.run_until_complete(self.runtime.load())
        self.process = ProcessMetrics("worker")
        loader = ArtifactLoader(config, tmp, "tiny-llama", ray_metrics=False)
        self.adapters = WorkerAdapters(self.config, self.runtime, self.pulled.manifest_digest,
                                       lambda: loader, WorkerMetrics(self.process, "tiny-llama"))

    def generate(self, adapter: Adapter | None, prompt: str = "Hello") -> str:
        async def run() -> str:
            if adapter is None:
                return (await self.runtime.generate(prompt, GREEDY)).text
            async with self.adapters.use(adapter) as name:
                return (await self.runtime.generate(prompt, GREEDY, adapter=name)).text

        return self.loop.run_until_complete(run())

    def counted(self, name: str) -> float:
        return self.process.registry.value(name, ("tiny-llama",)) or 0.0

    def close(self) -> None:
        self.adapters.release_all()
        self.loop.run_until_complete(self.runtime.unload())
        self.pulled.release()


@pytest.fixture
def worker(lora: LoraStore, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Worker]:
    made = Worker(lora, tmp_path, loop)
    yield made
    made.close()


def test_two_adapters_per_worker_and_a_third_evicts_the_least_recently_used(worker: Worker) -> None:
    base = worker.generate(None)
    through = {a.name: worker.generate(a) for a in (A, B)}
    assert worker.adapters.names() == ["lora-a", "lora-b"] == sorted(worker.runtime.adapters())
    assert worker.generate(A) == through["lora-a"]  # a hit: lora-a is now the most recent
    through["lora-c"] = worker.generate(C)
    assert worker.adapters.names() == ["lora-a", "lora-c"], "lora-b was the least recently used"
    assert sorted(worker.runtime.adapters()) == ["lora-a", "lora-c"]
    assert len(set(through.values()) | {base}) == 4, "each adapter has its own answer"
    assert (worker.counted("haif_adapter_loads_total"), worker.counted("haif_adapter_evictions_total"),
            worker.counted("haif_adapter_cache_hits_total")) == (3, 1, 1)
    # Loaded again on demand, with the same answer.
    assert worker.generate(B) == through["lora-b"]
    assert worker.adapters.names() == ["lora-c", "lora-b"]


def test_an_adapter_in_use_is_not_evicted_a_request_waits_for_room(worker: Worker) -> None:
    async def scenario() -> None:
        hold_a, hold_b = worker.adapters.use(A), worker.adapters.use(B)
        await hold_a.__aenter__()
        await hold_b.__aenter__()
        third = asyncio.ensure_future(_through(worker, C))
        await asyncio.sleep(0.3)
        assert not third.done(), "both loaded adapters are in use: no room yet"
        assert sorted(worker.runtime.adapters()) == ["lora-a", "lora-b"]
        await hold_a.__aexit__(None, None, None)
        await asyncio.wait_for(third, 30)
        assert worker.adapters.names() == ["lora-b", "lora-c"]
        await hold_b.__aexit__(None, None, None)

    worker.loop.run_until_complete(scenario())


async def _through(worker: Worker, adapter: Adapter) -> str:
    async with worker.adapters.use(adapter) as name:
        return (await worker.runtime.generate("Hello", GREEDY, adapter=name)).text


def test_concurrent_first_requests_load_an_adapter_once(worker: Worker) -> None:
    async def many() -> list[str]:
        return await asyncio.gather(*(_through(worker, A) for _ in range(6)))

    answers = worker.loop.run_until_complete(many())
    assert len(set(answers)) == 1
    assert worker.counted("haif_adapter_loads_total") == 1
    assert worker.counted("haif_adapter_cache_hits_total") == 5


@pytest.mark.parametrize(
    ("adapter", "error", "reason"),
    [
        (Adapter(f"{ROGUE}:1", f"{ROGUE}:1"), AdapterRejected, "untrusted_signer"),
        (Adapter(f"{WRONG_BASE}:1", f"{WRONG_BASE}:1"), AdapterRejected, "base_mismatch"),
        (Adapter("lora-nope:1", "lora-nope:1"), AdapterNotFound, "not found"),
    ],
)
def test_a_refused_adapter_loads_nothing_and_the_base_keeps_serving(
    lora: LoraStore, tmp_path: Path, loop: asyncio.AbstractEventLoop, adapter: Adapter, error: type,
    reason: str,
) -> None:
    worker = Worker(lora, tmp_path, loop, dynamic_adapters=True)
    try:
        base = worker.generate(None)
        with pytest.raises(error, match=reason):
            worker.generate(adapter)
        assert worker.adapters.names() == [] and worker.runtime.adapters() == []
        assert worker.counted("haif_adapter_loads_total") == 0
        assert worker.generate(None) == base
        assert worker.generate(A) != base  # and a good one still loads
    finally:
        worker.close()


def test_an_adapter_the_model_does_not_serve_is_refused(worker: Worker) -> None:
    with pytest.raises(AdapterRejected, match="does not serve adapter lora-z"):
        worker.generate(Adapter("lora-z", "lora-a:1"))
    with pytest.raises(AdapterRejected, match="does not serve adapter lora-a:1"):
        worker.generate(Adapter("lora-a:1", "lora-a:1"))  # on demand: only with dynamic_adapters
    with pytest.raises(AdapterRejected, match="does not serve adapter lora-a"):
        worker.generate(Adapter("lora-a", "lora-b:1"))  # the name with another artifact
