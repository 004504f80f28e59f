"""Structured outputs and sampling penalties on the torch runtime: what they cost in tokens/s.

16 concurrent requests on tiny-llama (CPU, in this process, no Ray), one batch: output
tokens/s with a ``json_schema`` grammar against the same requests unconstrained, and with
presence, frequency and repetition penalties against none. Every request runs to
``max_tokens`` (the schema asks for at least 20 items; the others ignore EOS), so that both
sides make the same number of tokens and the ratio is the processors' cost, not a batch
that empties sooner. Rounds are interleaved (drift on a shared machine hits both alike);
the figure is the median round, the spread the lowest and highest round's ratio.

Run from the repository root: ``python -m bench.structured``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import Row, median, print_table, round_ratios, write_results

if TYPE_CHECKING:
    from haif.runtimes.base import SamplingParams
    from haif.runtimes.torch import TorchRuntime

BENCH = "structured"
MODEL_DIR = Path(".haif/models/tiny-llama")
PROMPT = "List the inventory as JSON:"
# Objects of an integer, a bounded string and a boolean, at least 20 of them: structure all
# the way to max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 20,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "label": {"type": "string", "maxLength": 8},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "label", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}


def _params(max_tokens: int) -> dict[str, list[SamplingParams]]:
    from haif.runtimes.base import Guide, SamplingParams
    from haif.runtimes.tools import canonical

    guide = Guide("json_schema", canonical(SCHEMA))

    def each(**kw: object) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, **kw) for i in range(16)]  # type: ignore[arg-type]

    return {
        "json_schema": each(guide=guide),
        "unconstrained": each(ignore_eos=True),
        "penalties": each(ignore_eos=True, **PENALTIES),
        "no penalties": each(ignore_eos=True),
    }


async def _run(runtime: TorchRuntime, params: list[SamplingParams]) -> tuple[float, int]:
    start = time.perf_counter()
    outs = await asyncio.gather(*(runtime.generate(PROMPT, p) for p in params))
    elapsed = time.perf_counter() - start
    return sum(o.completion_tokens for o in outs) / elapsed, sum(o.completion_tokens for o in outs)


async def _measure(args: argparse.Namespace) -> dict[str, list[float]]:
    from haif.config import ModelConfig, TorchConfig
    from haif.runtimes.base import RuntimeContext
    from haif.runtimes.torch import TorchRuntime

    config = ModelConfig(
        name="tiny-llama", runtime="torch", path=str(args.model_dir),
        torch=TorchConfig(max_batch_size=16, max_wait_ms=20.0, threads=args.threads),
    )
    runtime = TorchRuntime(RuntimeContext(model=config, model_dir=str(args.model_dir), device="cpu",
                                          max_prompt_tokens=1024))
    await runtime.load()
    sides = _params(args.max_tokens)
    for params in sides.values():  # warm-up; the grammar compiles once, here
        await _run(runtime, params[:2])
    tok_s: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(args.rounds):
        names = list(sides) if i % 2 == 0 else list(reversed(sides))
        for name in names:
            rate, tokens = await _run(runtime, sides[name])
            if tokens != 16 * args.max_tokens:
                raise SystemExit(f"{name}: {tokens} tokens, not {16 * args.max_tokens}: the sides differ")
            tok_s[name].append(rate)
    print(f"runtime: {runtime.stats()}; grammars compiled: {runtime._grammar.compiled if runtime._grammar else 0}")
    await runtime.unload()
    return tok_s


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)

    from haif.devmodels import build_tiny_llama

    args.model_dir = build_tiny_llama(args.model_dir)
    tok_s = asyncio.run(_measure(args))
    rows = [
        Row(bench=BENCH, metric="tokens/s, json_schema (16 conc.)",
            haif=median(tok_s["json_schema"]), baseline=median(tok_s["unconstrained"]),
            baseline_name="the same requests unconstrained", higher_is_better=True, target=">= 0.7x",
            spread=round_ratios(tok_s["json_schema"], tok_s["unconstrained"])),
        Row(bench=BENCH, metric="tokens/s, penalties (16 conc.)",
            haif=median(tok_s["penalties"]), baseline=median(tok_s["no penalties"]),
            baseline_name="the same requests without", higher_is_better=True, target=">= 0.9x",
            spread=round_ratios(tok_s["penalties"], tok_s["no penalties"])),
    ]
    print_table(
        f"torch runtime: tiny-llama, 16 concurrent requests, max_tokens={args.max_tokens}, "
        f"temperature 1, median of {args.rounds} interleaved rounds; schema {json.dumps(SCHEMA)[:60]}...",
        rows,
    )
    path = write_results(BENCH, rows)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
