"""Dynamic batching in the torch runtime: 16 concurrent requests, batched vs one at a time.

Both configurations run tiny-llama on CPU in this process, the same requests, several
rounds each (interleaved, so drift on a shared machine hits both alike); the figure is
the median round. The model has random weights and may emit EOS early, so output
tokens/s (what was actually generated) is the headline metric, requests/s the second.

Run from the repository root: ``python -m bench.torch_batching``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import Row, median, print_table, write_results

if TYPE_CHECKING:
    from haif.runtimes.torch import TorchRuntime

BENCH = "torch_batching"
MODEL_DIR = Path(".haif/models/tiny-llama")
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


async def _round(
    runtime: TorchRuntime, concurrency: int, max_tokens: int
) -> tuple[float, int, int]:
    from haif.runtimes.base import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(concurrency)]
    start = time.perf_counter()
    outs = await asyncio.gather(*(runtime.generate(p, params) for p in prompts))
    elapsed = time.perf_counter() - start
    return elapsed, len(outs), sum(o.completion_tokens for o in outs)


def _runtime(model_dir: Path, max_batch_size: int, threads: int | None) -> TorchRuntime:
    from haif.config import ModelConfig, TorchConfig
    from haif.runtimes.base import RuntimeContext
    from haif.runtimes.torch import TorchRuntime

    config = ModelConfig(
        name="tiny-llama", runtime="torch", path=str(model_dir),
        torch=TorchConfig(max_batch_size=max_batch_size, max_wait_ms=5.0, threads=threads),
    )
    ctx = RuntimeContext(model=config, model_dir=str(model_dir), device="cpu",
                         max_prompt_tokens=1024)
    return TorchRuntime(ctx)


async def _measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    runtimes = {
        "batched": _runtime(args.model_dir, args.concurrency, args.threads),
        "unbatched": _runtime(args.model_dir, 1, args.threads),
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"req_s": [], "tok_s": []} for name in runtimes
    }
    for runtime in runtimes.values():
        await runtime.load()
        await _round(runtime, args.concurrency, 4)  # warm-up
    for _ in range(args.rounds):
        for name, runtime in runtimes.items():
            elapsed, n, tokens = await _round(runtime, args.concurrency, args.max_tokens)
            results[name]["req_s"].append(n / elapsed)
            results[name]["tok_s"].append(tokens / elapsed)
    for name, runtime in runtimes.items():
        print(f"{name}: {runtime.stats()}")
        await runtime.unload()
    return results


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)

    from haif.devmodels import build_tiny_llama

    args.model_dir = build_tiny_llama(args.model_dir)
    results = asyncio.run(_measure(args))
    baseline_name = "torch runtime, max_batch_size=1"
    rows = [
        Row(bench=BENCH, metric="output tokens/s (16 concurrent)",
            haif=median(results["batched"]["tok_s"]),
            baseline=median(results["unbatched"]["tok_s"]),
            baseline_name=baseline_name, higher_is_better=True, target=">= 3x"),
        Row(bench=BENCH, metric="requests/s (16 concurrent)",
            haif=median(results["batched"]["req_s"]),
            baseline=median(results["unbatched"]["req_s"]),
            baseline_name=baseline_name, higher_is_better=True, target=">= 3x"),
    ]
    print_table(
        f"torch runtime dynamic batching: tiny-llama, {args.concurrency} concurrent requests, "
        f"max_tokens={args.max_tokens}, greedy, median of {args.rounds} rounds",
        rows,
    )
    path = write_results(BENCH, rows)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
