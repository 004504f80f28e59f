"""`HAIF_P2P__ENABLED=true HAIF_P2P__BOOTSTRAP='["127.0.0.1:PORT"]' haif serve` (what
`make serve` runs, on configs/local.yaml) brings the P2P shim up on a local testnet, a
peer mapped with `haif p2p peers add` is served, and SIGTERM stops the sidecar too.

The models are overridden to the echo model alone (HAIF_MODELS) to keep the test short;
everything else is configs/local.yaml's: its own local Ray cluster, SQLite, the
development tenant `default`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.deployment import ROOT, read_until_served
from tests.support.net import free_port
from tests.support.p2p import node_public_key, run_peer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

HAIF = str(Path(sys.executable).parent / "haif")


def _haif(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([HAIF, *args, "--config", "configs/local.yaml"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_haif_serve_with_the_p2p_variables_serves_a_peer_on_a_local_testnet(
    testnet: list[str], tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "HAIF_P2P__ENABLED": "true",
        "HAIF_P2P__BOOTSTRAP": json.dumps(testnet),
        "HAIF_BASE_DIR": str(tmp_path),  # state, SQLite and artifacts of this run
        "HAIF_SERVER__PORT": str(port),
        "HAIF_MODELS": json.dumps([{"name": "echo", "runtime": "echo", "device": "cpu", "num_cpus": 0.1}]),
        "HAIF_ARTIFACTS__DEV_PUBLISH": "[]",
    })
    # The shim's key, before anything runs: from the seed `haif p2p info` creates.
    info = _haif(env, "p2p", "info")
    shim_key = next(line.split(": ", 1)[1] for line in info.splitlines() if line.startswith("public key: "))
    assert "enabled: true" in info and f"bootstrap: {','.join(testnet)}" in info and "host: 127.0.0.1" in info
    proc = subprocess.Popen([HAIF, "serve", "--config", "configs/local.yaml"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sidecar_pid = None
    try:
        read_until_served(proc)
        url = f"http://127.0.0.1:{port}"

        def shim_up() -> dict | None:
            p2p = httpx.get(f"{url}/readyz", timeout=10).json().get("p2p") or {}
            return p2p if p2p.get("state") == "ok" else None

        p2p = wait_for(shim_up, 120, 0.5, "the P2P shim up on the testnet")
        assert p2p["listening_key"] == p2p["public_key"] == shim_key
        assert p2p["bootstrap"] == testnet and p2p["host"] == "127.0.0.1"
        sidecar_pid = p2p["pid"]
        seed = secrets.token_bytes(32)
        key = node_public_key(seed)
        strangers = run_peer(testnet, shim_key, [{"method": "haif.models", "value": {}}])["results"]
        assert strangers[0]["error"]["cause"]["code"] == "UNAUTHORIZED", strangers
        _haif(env, "p2p", "peers", "add", key, "--tenant", "default")  # make serve's development tenant
        models, completion = run_peer(testnet, shim_key, [
            {"method": "haif.models", "value": {}},
            {"method": "haif.completions", "value": {"model": "echo", "prompt": "served over p2p", "max_tokens": 8}},
        ], seed=seed)["results"]
        assert [m["id"] for m in models["value"]["data"]] == ["echo"], models
        assert completion["value"]["choices"][0]["text"] == "served over p2p", completion
        # `haif p2p info` asks the running deployment's /readyz (within a few seconds each time).
        running = wait_for(lambda: "shim: ok" in (out := _haif(env, "p2p", "info")) and out, 60, 1.0,
                           "haif p2p info to see the running shim")
        assert "connected peers:" in running, running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # SIGTERM stopped everything `haif serve` started, the sidecar included.
    assert sidecar_pid is not None
    wait_for(lambda: not psutil.pid_exists(sidecar_pid) or psutil.Process(sidecar_pid).status() == psutil.STATUS_ZOMBIE,
             30, 0.5, "the sidecar to exit")
