"""P2P: peers through HAIF's Hyperswarm RPC shim vs HTTP, and a remote P2P worker vs a local one.

One Ray cluster and one HAIF deployment in this script, its P2P shim on a local hyperdht
testnet (127.0.0.1), and every side measured in interleaved rounds:

* echo, c=1 and c=32: a peer with the real @hyperswarm/rpc (``haif/p2p/sidecar/tools/bench.js``,
  one connection, requests multiplexed on it) calls ``haif.completions``; the baseline is the
  same request over HTTP to the same deployment (``/v1/completions``, httpx). Both run the
  Gateway's pipeline; the P2P side adds the sidecar, the Unix-socket link and the P2PShim
  replica's hop to the Gateway.
* the transport's floor: the same peer against a bare @hyperswarm/rpc echo server in another
  Node process on the same testnet (what any request costs on this transport before HAIF
  does anything), beside the P2P figures, without a target.
* streamed: ``stream: true`` echo completions made token by token (1 ms apart,
  ``stream_batch_ms: 0``, no cap on pieces per second), each chunk a ``haif.stream.chunk``
  event vs an SSE event; and the bare server sending as many events per request.
* a remote P2P worker: ``haif p2p worker --model tiny-llama-p2p`` (a process of its own,
  outside Ray, behind its own sidecar) vs a local worker actor of the same checkpoint and
  runtime settings (``tiny-llama``, one torch thread each): streamed HTTP completions,
  output tokens/s at c=8. A model needs a local worker: ``tiny-llama-p2p``'s points at an
  empty directory and fails to load, so that the P2P worker serves all of its requests.

Run from the repository root: ``python -m bench.p2p``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import Row, median, percentile, print_table, round_ratios, write_results
from bench.loadgen import run_level

BENCH = "p2p"
PORT = 8322
API_KEY = "bench-key-0123456789abcdef"
STATE_DIR = Path(".haif/bench-p2p")
MODEL_DIR = Path(".haif/models/tiny-llama")
TOOLS = Path(__file__).resolve().parents[1] / "haif" / "p2p" / "sidecar" / "tools"
BODY = {"model": "echo", "prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": 16}
STREAM_TOKENS = 32
STREAM_BODY = {"model": "echo-stream", "prompt": " ".join(f"w{i}" for i in range(STREAM_TOKENS)),
               "max_tokens": STREAM_TOKENS, "stream": True}
PROMPTS = [
    "The teacher carried a basket of plums to the market",
    "Why is the river so quiet this morning?",
    "On Monday we ate pancakes with a librarian from Norway.",
    "The old lighthouse still shines every night, although no ship has needed it for years.",
]
BATCH = 10  # requests per side in a row before the next side's turn (latency rounds)


class NodePeer:
    """``tools/bench.js``: one JSON command per line, one JSON answer per line."""

    def __init__(self, stack: ExitStack, bootstrap: list[str], seed: bytes | None = None) -> None:
        self._proc = subprocess.Popen(
            ["node", str(TOOLS / "bench.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        stack.callback(self._close)
        self.public_key = self.send({"op": "init", "bootstrap": bootstrap, "seed": seed.hex() if seed else None})[
            "public_key"
        ]

    def send(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.js exited ({self._proc.wait()})")
        return json.loads(line)

    def run(self, server: str, method: str, value: dict[str, Any], requests: int, concurrency: int = 1,
            stream: bool = False) -> dict[str, Any]:
        result = self.send({"op": "run", "server": server, "method": method, "value": value,
                            "requests": requests, "concurrency": concurrency, "stream": stream})
        if result["errors"]:
            raise RuntimeError(f"{method} on {server[:12]}...: {result['errors']}")
        return result

    def _close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _testnet(stack: ExitStack) -> list[str]:
    proc = subprocess.Popen(["node", str(TOOLS / "testnet.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)

    def stop() -> None:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=10)

    stack.callback(stop)
    return json.loads(proc.stdout.readline())["bootstrap"]  # type: ignore[union-attr]


def _config_data(bootstrap: list[str], peer_key: str, worker_key: str, remote_path: str) -> dict[str, Any]:
    # One torch thread on both sides: what Ray gives a worker actor of num_cpus < 1
    # (OMP_NUM_THREADS=1), and the P2P worker's process would otherwise take every core.
    torch = {"max_batch_size": 8, "max_wait_ms": 5, "threads": 1}
    return {
        "server": {"port": PORT, "state_dir": str(STATE_DIR), "app_name": "haif"},
        "auth": {"dev_api_key": API_KEY, "backend": "static"},
        "p2p": {"enabled": True, "bootstrap": bootstrap, "peers": {peer_key: "bench"}},
        "models": [
            {"name": "echo", "runtime": "echo", "device": "cpu", "num_cpus": 0.1},
            # Token by token (1 ms apart, so that each is a piece of its own), no cap on the
            # worker's pieces per second: one chunk per token on both sides.
            {"name": "echo-stream", "runtime": "echo", "device": "cpu", "num_cpus": 0.1, "stream_batch_ms": 0,
             "stream_pieces_per_s": 0, "echo": {"token_delay_ms": 1}},
            {"name": "tiny-llama", "runtime": "torch", "path": str(MODEL_DIR), "device": "cpu", "num_cpus": 0.5,
             "max_model_len": 512, "torch": torch},
            {"name": "tiny-llama-p2p", "runtime": "torch", "path": remote_path, "device": "cpu", "num_cpus": 0.1,
             "max_model_len": 512, "torch": torch, "p2p_workers": [worker_key]},
        ],
    }


def _p2p_worker(stack: ExitStack, data: dict[str, Any], seed_file: Path, shim_key: str) -> None:
    """``haif p2p worker --model tiny-llama-p2p``, with the checkpoint where the deployment's has none."""
    worker_data = json.loads(json.dumps(data))
    for model in worker_data["models"]:
        if model["name"] == "tiny-llama-p2p":
            model["path"] = str(MODEL_DIR)
    path = STATE_DIR / "p2p-worker.yaml"
    path.write_text(yaml.safe_dump(worker_data))
    haif = str(Path(sys.executable).parent / "haif")
    proc = subprocess.Popen(
        [haif, "p2p", "worker", "--model", "tiny-llama-p2p", "--config", str(path), "--seed-file", str(seed_file),
         "--allow", shim_key],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    stack.callback(stop)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("public key:"):
            return
    raise RuntimeError(f"haif p2p worker exited ({proc.wait()})")


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


# --- HTTP, the baseline --------------------------------------------------------------------


def _http_latencies(client: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        resp = client.post("/v1/completions", json=BODY)
        out.append((time.perf_counter() - start) * 1000)
        resp.raise_for_status()
    return out


def _http_stream_one(client: httpx.Client) -> tuple[float, int]:
    start = time.perf_counter()
    chunks = 0
    with client.stream("POST", "/v1/completions", json=STREAM_BODY) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
    return (time.perf_counter() - start) * 1000, chunks


async def _http_throughput(base: str, concurrency: int, total: int, stream: bool) -> tuple[float, int]:
    """(requests/s, chunks) of ``total`` requests, ``concurrency`` at a time."""
    todo = iter(range(total))
    chunks = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60, limits=limits) as client:
        async def user() -> None:
            nonlocal chunks
            for _ in todo:
                if not stream:
                    (await client.post("/v1/completions", json=BODY)).raise_for_status()
                    continue
                async with client.stream("POST", "/v1/completions", json=STREAM_BODY) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunks += 1

        start = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return total / elapsed, chunks


# --- the measurement -------------------------------------------------------------------------


def _measure(args: argparse.Namespace, base: str, peer: NodePeer, shim: str, bare: str) -> dict[str, list[float]]:
    sides: dict[str, list[float]] = {}

    def add(name: str, values: list[float] | float) -> None:
        sides.setdefault(name, []).extend(values if isinstance(values, list) else [values])

    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    sample_chunk = None
    with http:
        # Warm-up: connections, the Gateway's caches, the routes.
        _http_latencies(http, 20)
        peer.run(shim, "haif.completions", BODY, 20)
        peer.run(bare, "echo", BODY, 20)
        _, stream_chunks = _http_stream_one(http)
        p2p_stream = peer.run(shim, "haif.completions", STREAM_BODY, 2, stream=True)
        stream_chunks_p2p = p2p_stream["chunks"] // 2
        sample_chunk = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "echo-stream",
                        "choices": [{"index": 0, "text": " w1", "finish_reason": None, "logprobs": None}]}
        bare_stream = {"chunks": stream_chunks_p2p, "chunk": sample_chunk}
        for i in range(args.rounds):
            p50: dict[str, list[float]] = {"p2p": [], "http": [], "bare": []}
            for _ in range(args.latency_requests // BATCH):
                p50["p2p"] += peer.run(shim, "haif.completions", BODY, BATCH)["latencies_ms"]
                p50["http"] += _http_latencies(http, BATCH)
                p50["bare"] += peer.run(bare, "echo", BODY, BATCH)["latencies_ms"]
            for name, values in p50.items():
                add(f"lat {name}", values)
                add(f"round p50 {name}", percentile(values, 50))
            stream_ms: dict[str, list[float]] = {"p2p": [], "http": [], "bare": []}
            for _ in range(args.stream_requests // BATCH):
                stream_ms["p2p"] += peer.run(shim, "haif.completions", STREAM_BODY, BATCH, stream=True)["latencies_ms"]
                stream_ms["http"] += [_http_stream_one(http)[0] for _ in range(BATCH)]
                stream_ms["bare"] += peer.run(bare, "echo.stream", bare_stream, BATCH, stream=True)["latencies_ms"]
            for name, values in stream_ms.items():
                add(f"stream {name}", values)
                add(f"round stream p50 {name}", percentile(values, 50))
            order = ["p2p", "http", "bare"] if i % 2 == 0 else ["bare", "http", "p2p"]
            for name in order:
                n, c = args.throughput_requests, args.concurrency
                if name == "http":
                    add("rps http", asyncio.run(_http_throughput(base, c, n, stream=False))[0])
                    rps, chunks = asyncio.run(_http_throughput(base, c, n // 2, stream=True))
                    add("chunks/s http", rps * chunks / (n // 2))
                    continue
                server, method, stream_value = (shim, "haif.completions", STREAM_BODY) if name == "p2p" else (
                    bare, "echo", bare_stream)
                add(f"rps {name}", n / peer.run(server, method, BODY, n, c)["elapsed_ms"] * 1000)
                streamed = peer.run(server, "echo.stream" if name == "bare" else method, stream_value, n // 2, c,
                                    stream=True)
                add(f"chunks/s {name}", streamed["chunks"] / streamed["elapsed_ms"] * 1000)
            # The remote P2P worker against a local worker actor, same checkpoint and runtime.
            models = ["tiny-llama", "tiny-llama-p2p"] if i % 2 == 0 else ["tiny-llama-p2p", "tiny-llama"]
            for model in models:
                level = asyncio.run(run_level(base, model, PROMPTS, args.llm_concurrency, args.llm_requests,
                                              args.llm_max_tokens, api_key=API_KEY))
                add(f"tok/s {model}", level.output_tokens_per_s)
    sides["stream chunks"] = [float(stream_chunks), float(stream_chunks_p2p)]
    return sides


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=100)
    parser.add_argument("--stream-requests", type=int, default=30)
    parser.add_argument("--throughput-requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--llm-concurrency", type=int, default=8)
    parser.add_argument("--llm-requests", type=int, default=16)
    parser.add_argument("--llm-max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from haif.config import HaifConfig
    from haif.devmodels import build_tiny_llama
    from haif.ingress import wait_ready
    from haif.p2p.keys import public_key, public_key_hex
    from serve_app import deploy

    build_tiny_llama(MODEL_DIR)
    (STATE_DIR / "no-model").mkdir(parents=True, exist_ok=True)  # tiny-llama-p2p's local worker: nothing to load
    base = f"http://127.0.0.1:{PORT}"
    peer_seed, worker_seed = secrets.token_bytes(32), secrets.token_bytes(32)
    worker_seed_file = STATE_DIR / "p2p-worker.seed"
    worker_seed_file.write_bytes(worker_seed)
    worker_seed_file.chmod(0o600)
    with ExitStack() as stack:
        bootstrap = _testnet(stack)
        data = _config_data(bootstrap, public_key(peer_seed).hex(), public_key(worker_seed).hex(),
                            str(STATE_DIR / "no-model"))
        config = HaifConfig.model_validate(data)
        shim_key = public_key_hex(config.p2p_seed_path())
        ray.init(address="local", namespace="haif-bench-p2p", include_dashboard=False, log_to_driver=False)
        stack.callback(ray.shutdown)
        stack.callback(serve.shutdown)
        deploy(config)
        _p2p_worker(stack, data, worker_seed_file, shim_key)  # tiny-llama-p2p is loading until it is up
        wait_ready(base, timeout_s=600)
        _wait(lambda: (httpx.get(f"{base}/readyz", timeout=5).json().get("p2p") or {}).get("state") == "ok", 120,
              "the P2P shim up")
        orchestrator = serve.get_deployment_handle("Orchestrator", app_name="haif")
        _wait(lambda: "ready" in orchestrator.status.remote().result()["models"]["tiny-llama-p2p"]
              ["p2p_workers"].values(), 120, "the P2P worker ready in the routing table")
        peer = NodePeer(stack, bootstrap, peer_seed)
        bare = NodePeer(stack, bootstrap).send({"op": "serve"})["public_key"]
        sides = _measure(args, base, peer, shim_key, bare)

    lat = {k: sides[f"lat {k}"] for k in ("p2p", "http", "bare")}
    rp50 = {k: sides[f"round p50 {k}"] for k in ("p2p", "http", "bare")}
    stream = {k: sides[f"stream {k}"] for k in ("p2p", "http", "bare")}
    rstream = {k: sides[f"round stream p50 {k}"] for k in ("p2p", "http", "bare")}
    rps = {k: sides[f"rps {k}"] for k in ("p2p", "http", "bare")}
    cps = {k: sides[f"chunks/s {k}"] for k in ("p2p", "http", "bare")}
    tok = {"local": sides["tok/s tiny-llama"], "p2p": sides["tok/s tiny-llama-p2p"]}
    http_name, bare_name = "the same request over HTTP, same deployment", "bare @hyperswarm/rpc echo, 2 Node processes"
    c = args.concurrency
    rows = [
        Row(BENCH, "latency p50 ms (c=1), echo", percentile(lat["p2p"], 50), percentile(lat["http"], 50),
            http_name, False, "<= 1.5x", round_ratios(rp50["p2p"], rp50["http"])),
        Row(BENCH, "latency p99 ms (c=1), echo", percentile(lat["p2p"], 99), percentile(lat["http"], 99),
            http_name, False),
        Row(BENCH, f"requests/s (c={c}), echo", median(rps["p2p"]), median(rps["http"]), http_name, True,
            ">= 0.7x", round_ratios(rps["p2p"], rps["http"])),
        Row(BENCH, f"streamed {STREAM_TOKENS} tokens, p50 ms to the end (c=1)", percentile(stream["p2p"], 50),
            percentile(stream["http"], 50), "the same stream over HTTP (SSE)", False, "",
            round_ratios(rstream["p2p"], rstream["http"])),
        Row(BENCH, f"streamed chunks/s (c={c})", median(cps["p2p"]), median(cps["http"]),
            "the same streams over HTTP (SSE)", True, "", round_ratios(cps["p2p"], cps["http"])),
        Row(BENCH, "latency p50 ms (c=1), HAIF's P2P vs the transport", percentile(lat["p2p"], 50),
            percentile(lat["bare"], 50), bare_name, False, "", round_ratios(rp50["p2p"], rp50["bare"])),
        Row(BENCH, f"requests/s (c={c}), HAIF's P2P vs the transport", median(rps["p2p"]), median(rps["bare"]),
            bare_name, True, "", round_ratios(rps["p2p"], rps["bare"])),
        Row(BENCH, f"streamed chunks/s (c={c}), HAIF's P2P vs the transport", median(cps["p2p"]),
            median(cps["bare"]), "bare @hyperswarm/rpc events, as many per request", True, "",
            round_ratios(cps["p2p"], cps["bare"])),
        Row(BENCH, f"output tokens/s (c={args.llm_concurrency}), tiny-llama on a P2P worker", median(tok["p2p"]),
            median(tok["local"]), "the same runtime as a local worker actor", True, ">= 0.8x",
            round_ratios(tok["p2p"], tok["local"])),
    ]
    http_chunks, p2p_chunks = sides["stream chunks"]
    print_table(
        f"p2p: HAIF's Hyperswarm RPC shim on a loopback testnet ({args.rounds} interleaved rounds; "
        f"a stream: {p2p_chunks:.0f} chunks over P2P, {http_chunks:.0f} SSE events over HTTP)",
        rows,
    )
    path = write_results(BENCH, rows)
    print(f"\nwrote {path}")
    print(json.dumps([r.to_json() for r in rows]))
    return rows


if __name__ == "__main__":
    main()
