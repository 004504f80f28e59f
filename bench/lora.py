"""LoRA adapters on the runtimes, in this process: a batch spread over adapters vs the base
alone, and what the first request to a cold adapter costs.

* torch runtime: 16 concurrent greedy requests spread over 4 adapters (4 each, sharing
  batches: HAIF's batched LoRA) against the same 16 on the base alone; output tokens/s,
  interleaved rounds, median round. Target: >= 0.7x.
* cold adapter: a worker's first request to an adapter it has not loaded (pull from a
  local three-replica store into an empty node cache, signature and digests verified,
  loaded into the runtime, then the request) against the same request warm plus the
  adapter's pull-and-verify measured alone. Target: <= 1.5x.
* vLLM (when installed; ``--no-vllm`` skips it, its engine takes a minute to start on
  CPU): the same mix on HAIF's vLLM runtime against the base alone, both on one engine
  with LoRA enabled. Target: >= 0.8x.

The adapters are ``haif.devmodels.build_tiny_lora`` ones (seeded, non-zero B, all seven
projections of every layer, rank 8): greedy output differs from the base's, so the two
sides may generate different numbers of tokens before EOS; tokens/s counts what each made.

Run from the repository root: ``python -m bench.lora``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import Row, median, print_table, round_ratios, write_results

if TYPE_CHECKING:
    from haif.artifacts import ArtifactLoader
    from haif.runtimes import Runtime

BENCH = "lora"
MODEL_DIR = Path(".haif/models/tiny-llama")
ADAPTERS = 4
PROMPTS = [
    "The teacher carried a basket of plums to the market",
    "Why is the river so quiet this morning?",
    "On Monday we ate pancakes with a librarian from Norway.",
    "Hello, how are you today?",
    "The old lighthouse still shines every night, although no ship has needed it for years.",
    "Question: what does a pilot do? Answer:",
    "It was a bright town, and the",
    "Write a poem about the sea.",
]


class Store:
    """tiny-llama and its adapters, published and signed into a local three-replica store."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        from haif.artifacts import ArtifactRef, ArtifactStore, SigningKey, TrustPolicy
        from haif.config import ArtifactsConfig
        from haif.devmodels import build_tiny_lora

        self.root = root
        self.key = SigningKey.generate()
        self.config = ArtifactsConfig(
            replicas=[str(root / f"replica-{i}") for i in (1, 2, 3)], cache_dir=str(root / "cache"),
            trusted_keys=[self.key.public_key.text()],
        )
        store = ArtifactStore.from_config(self.config)
        trust = TrustPolicy(global_keys=(self.key.public_key,))
        self.base = store.publish(model_dir, "tiny-llama", "1", self.key, trust=trust).manifest_digest
        adapter_of = store.adapter_of(ArtifactRef.parse("tiny-llama:1"), trust)
        self.adapters: dict[str, Path] = {}
        for i in range(ADAPTERS + 1):  # the last one: the cold one
            path = build_tiny_lora(root / "src" / f"lora-{i}", model_dir, seed=100 + i)
            store.publish(path, f"lora-{i}", "1", self.key, trust=trust, adapter=adapter_of)
            self.adapters[f"lora-{i}"] = path

    def loader(self, cache: str) -> ArtifactLoader:
        from haif.artifacts import ArtifactLoader

        config = self.config.model_copy(update={"cache_dir": str(self.root / cache)})
        return ArtifactLoader(config, self.root, "tiny-llama", ray_metrics=False)


async def _round(runtime: Runtime, adapters: list[str | None], max_tokens: int) -> tuple[float, int]:
    from haif.runtimes.base import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started = time.perf_counter()
    outs = await asyncio.gather(*(
        runtime.generate(f"{PROMPTS[i % len(PROMPTS)]} ({i})", params, adapter=adapter)
        for i, adapter in enumerate(adapters)
    ))
    return time.perf_counter() - started, sum(o.completion_tokens for o in outs)


async def _mix(runtime: Runtime, args: argparse.Namespace) -> dict[str, list[float]]:
    """tokens/s of ``args.concurrency`` requests on the base alone, then spread over the
    adapters, round after round."""
    spread = [f"lora-{i % ADAPTERS}" for i in range(args.concurrency)]
    sides: dict[str, list[str | None]] = {"base": [None] * args.concurrency, "adapters": list(spread)}
    results: dict[str, list[float]] = {name: [] for name in sides}
    for adapters in sides.values():
        await _round(runtime, adapters, 4)  # warm-up
    for _ in range(args.rounds):
        for name, adapters in sides.items():
            elapsed, tokens = await _round(runtime, adapters, args.max_tokens)
            results[name].append(tokens / elapsed)
    return results


def _torch_runtime(model_dir: Path, args: argparse.Namespace) -> Runtime:
    from haif.config import ModelConfig
    from haif.runtimes.base import RuntimeContext
    from haif.runtimes.torch import TorchRuntime

    config = ModelConfig(
        name="tiny-llama", runtime="torch", path=str(model_dir), max_adapters_per_worker=ADAPTERS + 1,
        torch={"max_batch_size": args.concurrency, "max_wait_ms": 5.0, "threads": args.threads},
        dynamic_adapters=True,
    )
    return TorchRuntime(RuntimeContext(model=config, model_dir=str(model_dir), device="cpu",
                                       max_prompt_tokens=1024))


async def _cold(runtime: Runtime, store: Store, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per round: pull-and-verify alone (an empty cache), the first request through the
    worker's adapter path into another empty cache (pull, verify, load, request), then the
    same request warm (the median of three)."""
    from actors.adapters import WorkerAdapters
    from haif.envelope import Adapter
    from haif.runtimes.base import SamplingParams
    from haif.telemetry.metrics import ProcessMetrics, WorkerMetrics

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    cold = Adapter(f"lora-{ADAPTERS}:1", f"lora-{ADAPTERS}:1")
    out: dict[str, list[float]] = {"pull": [], "cold": [], "warm": []}
    for i in range(args.rounds):
        started = time.perf_counter()
        store.loader(f"cache-pull-{i}").acquire_adapter(cold.artifact, store.base).release()
        out["pull"].append(time.perf_counter() - started)
        loader = store.loader(f"cache-cold-{i}")
        adapters = WorkerAdapters(runtime.ctx.model, runtime, store.base, lambda loader=loader: loader,
                                  WorkerMetrics(ProcessMetrics("bench"), "tiny-llama"))
        took = []
        for _ in range(4):  # the first one cold, then warm ones (their median)
            started = time.perf_counter()
            async with adapters.use(cold) as name:
                await runtime.generate(PROMPTS[0], params, adapter=name)
            took.append(time.perf_counter() - started)
        out["cold"].append(took[0])
        out["warm"].append(median(took[1:]))
        await runtime.unload_adapter(cold.name)
        adapters.release_all()
        for cache in (f"cache-pull-{i}", f"cache-cold-{i}"):
            shutil.rmtree(store.root / cache, ignore_errors=True)
    return out


async def _torch(model_dir: Path, store: Store, args: argparse.Namespace) -> list[Row]:
    runtime = _torch_runtime(model_dir, args)
    await runtime.load()
    for name in list(store.adapters)[:ADAPTERS]:
        await runtime.load_adapter(name, str(store.adapters[name]))
    mix = await _mix(runtime, args)
    cold = await _cold(runtime, store, args)
    print(f"torch runtime: {runtime.stats()}")  # type: ignore[attr-defined]
    await runtime.unload()
    warm_plus_pull = [w + p for w, p in zip(cold["warm"], cold["pull"], strict=True)]
    print("cold rounds (s): " + ", ".join(
        f"pull {p:.3f} cold {c:.3f} warm {w:.3f}" for p, c, w in zip(cold["pull"], cold["cold"], cold["warm"], strict=True)
    ))
    return [
        Row(bench=BENCH, metric=f"output tokens/s ({args.concurrency} over {ADAPTERS} adapters), torch",
            haif=median(mix["adapters"]), baseline=median(mix["base"]),
            baseline_name=f"the same {args.concurrency} on the base alone", higher_is_better=True,
            target=">= 0.7x", spread=round_ratios(mix["adapters"], mix["base"])),
        Row(bench=BENCH, metric="first request to a cold adapter s, torch",
            haif=median(cold["cold"]), baseline=median(warm_plus_pull),
            baseline_name="the same request warm + the adapter's pull-and-verify alone",
            higher_is_better=False, target="<= 1.5x", spread=round_ratios(cold["cold"], warm_plus_pull)),
        Row(bench=BENCH, metric="adapter pull-and-verify s (empty node cache)",
            haif=median(cold["pull"]), baseline=median(cold["warm"]),
            baseline_name="one warm request through the adapter", higher_is_better=False),
    ]


async def _vllm(model_dir: Path, store: Store, args: argparse.Namespace) -> list[Row]:
    from haif.config import ModelConfig
    from haif.runtimes.base import RuntimeContext
    from haif.runtimes.vllm import VllmRuntime

    config = ModelConfig(
        name="tiny-llama", runtime="vllm", path=str(model_dir), max_model_len=512, dynamic_adapters=True,
        max_adapters_per_worker=ADAPTERS,
        engine={"enforce_eager": True, "max_num_seqs": args.concurrency, "max_lora_rank": 8},
    )
    runtime = VllmRuntime(RuntimeContext(model=config, model_dir=str(model_dir), device="cpu",
                                         max_prompt_tokens=256))
    await runtime.load()
    try:
        for name in list(store.adapters)[:ADAPTERS]:
            await runtime.load_adapter(name, str(store.adapters[name]))
        mix = await _mix(runtime, args)
    finally:
        await runtime.unload()
    return [
        Row(bench=BENCH, metric=f"output tokens/s ({args.concurrency} over {ADAPTERS} adapters), vLLM",
            haif=median(mix["adapters"]), baseline=median(mix["base"]),
            baseline_name=f"the same {args.concurrency} on the base alone (LoRA enabled)",
            higher_is_better=True, target=">= 0.8x", spread=round_ratios(mix["adapters"], mix["base"])),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false",
                        help="leave out the mix on the vLLM runtime")
    args = parser.parse_args(argv)

    from haif.devmodels import build_tiny_llama

    model_dir = build_tiny_llama(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="haif-bench-lora-") as tmp:
        store = Store(Path(tmp), model_dir)
        rows = asyncio.run(_torch(model_dir, store, args))
        if args.vllm and importlib.util.find_spec("vllm") is not None:
            rows += asyncio.run(_vllm(model_dir, store, args))
    print_table(
        f"LoRA adapters: tiny-llama, {args.concurrency} concurrent greedy requests, "
        f"max_tokens={args.max_tokens}, median of {args.rounds} interleaved rounds",
        rows,
    )
    path = write_results(BENCH, rows)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
