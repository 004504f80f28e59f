"""`haif serve` with ``server.ingress: haproxy``: HAProxy listens on the configured port in
front of the Bridge's own HTTP server (Ray Serve's direct ingress), the official OpenAI
client works through it, streamed and not, and Serve's proxy actor carries none of it.

It runs `haif serve` as a user would, in a process (and Ray cluster) of its own: Ray
Serve reads its ingress from the environment when it is imported."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from haif.config import HaifConfig
from haif.exceptions import ConfigError
from haif.ingress import check_ingress
from tests.support.net import free_port

pytestmark = pytest.mark.integration

KEY = "haproxy-ingress-key-0123456789"
START_TIMEOUT_S = 300


def _config(tmp: Path, port: int) -> dict:
    state = tmp / "state"
    return {
        "server": {"host": "127.0.0.1", "port": port, "state_dir": str(state), "ingress": "haproxy"},
        "ray": {"num_cpus": 2, "include_dashboard": False},
        "auth": {"backend": "static", "dev_api_key": KEY},
        "database": {"url": f"sqlite:///{state}/haif.db"},
        "artifacts": {
            "replicas": [str(state / "artifacts")], "write_quorum": 1, "cache_dir": str(state / "cache"),
            "dev_signing_key": str(state / "keys" / "dev.key"),
        },
        "models": [{"name": "echo", "runtime": "echo", "device": "cpu", "num_cpus": 0.1}],
    }


def _lines(proc: subprocess.Popen) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_url(proc: subprocess.Popen, lines: queue.Queue[str]) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.startswith("URL: "):
            return seen
    raise AssertionError("haif serve did not come up:\n" + "".join(seen[-60:]))


def _listeners(port: int) -> set[str]:
    names = set()
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            names.add(psutil.Process(conn.pid).name())
    return names


def test_haif_serve_behind_haproxy_answers_the_openai_client(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "haif.json"  # JSON is YAML
    config.write_text(json.dumps(_config(tmp_path, port)))
    env = {**os.environ, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    env.pop("RAY_ADDRESS", None)  # a cluster of its own
    env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)  # haif serve sets it from the config
    proc = subprocess.Popen(
        [sys.executable, "-m", "haif.cli.main", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = _lines(proc)
    try:
        _wait_for_url(proc, lines)
        assert "haproxy" in _listeners(port)  # HAProxy, not Serve's proxy actor, holds the port

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        done = client.completions.create(model="echo", prompt="one two three", max_tokens=8)
        assert done.choices[0].text.strip() == "one two three"
        stream = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "four five six"}],
            stream=True, stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == "four five six"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert proc.returncode == 0, "".join(rest[-40:])


def test_a_deployment_refuses_an_ingress_its_cluster_does_not_run() -> None:
    # This process's Serve runs the proxy ingress (the test session's cluster).
    haproxy = HaifConfig.model_validate({"server": {"ingress": "haproxy"}, "models": []})
    with pytest.raises(ConfigError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        check_ingress(haproxy)
    check_ingress(HaifConfig.model_validate({"models": []}))
