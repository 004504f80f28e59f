"""A small streaming load generator for OpenAI-compatible servers (HAIF and baselines).

It sends streamed /v1/completions requests at a fixed concurrency and records, per
request, time to first token, end-to-end latency and completion tokens (from the
final usage chunk), so that both sides of a comparison are measured the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from statistics import median

import httpx

from bench.common import percentile


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    e2e_s: float
    completion_tokens: int


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    wall_s: float
    samples: list[Sample]
    rounds: list[float] = field(default_factory=list)  # each round's output tokens/s, merged
    # CPU seconds of each of the server's processes while it ran (merged: summed)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        """Output tokens/s; for rounds merged into one result, the median round's."""
        if self.rounds:
            return median(self.rounds)
        return sum(s.completion_tokens for s in self.samples) / self.wall_s

    @classmethod
    def merged(cls, results: list[LevelResult]) -> LevelResult:
        """Rounds of one level as one result: latencies pooled, throughput the median
        round's (one round that hits a slow spell of a shared machine does not decide)."""
        (concurrency,) = {r.concurrency for r in results}
        cpu_s: dict[str, float] = {}
        for r in results:
            for process, seconds in r.cpu_s.items():
                cpu_s[process] = cpu_s.get(process, 0.0) + seconds
        return cls(
            concurrency,
            sum(r.wall_s for r in results),
            [s for r in results for s in r.samples],
            [r.output_tokens_per_s for r in results],
            cpu_s,
        )

    def ttft_ms(self, pct: float) -> float:
        return percentile([s.ttft_s * 1000 for s in self.samples], pct)

    def e2e_ms(self, pct: float) -> float:
        return percentile([s.e2e_s * 1000 for s in self.samples], pct)


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"{url}: {resp.status_code} {resp.text[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return Sample((first or end) - start, end - start, tokens)


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    requests: int,
    max_tokens: int,
    api_key: str = "none",
) -> LevelResult:
    """``requests`` streamed completions, ``concurrency`` in flight at a time."""
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=concurrency + 4)
    todo = iter(range(requests))
    samples: list[Sample] = []

    async def user(client: httpx.AsyncClient) -> None:
        for i in todo:
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            samples.append(await _one(client, url, body))

    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        await _one(client, url, {**_warm(model, prompts[0]), "max_tokens": 4})
        start = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LevelResult(concurrency, wall, samples)


def _warm(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
