"""Stopping `haif serve` stops its workers: the workers are detached actors (they outlive
an Orchestrator replica), so nothing but HAIF's own stop path ends them; after SIGTERM no
worker process of that run is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.support.deployment import ROOT, read_until_served
from tests.support.net import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.chaos



def _workers_of(pid: int) -> list[psutil.Process]:
    """The worker actor processes among ``pid``'s descendants (Ray titles them)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ModelWorker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_haif_serve_leaves_no_worker_after_sigterm(tmp_path: Path) -> None:
    config = {
        "server": {"host": "127.0.0.1", "port": free_port(), "state_dir": str(tmp_path / "state")},
        "auth": {"dev_api_key": "stop-test-key-0123456789"},
        "database": {"url": f"sqlite:///{tmp_path / 'haif.db'}"},
        "ray": {"num_cpus": 2},
        "artifacts": {"replicas": [str(tmp_path / "r1")], "cache_dir": str(tmp_path / "cache"), "dev_publish": []},
        "models": [{"name": "echo", "runtime": "echo", "device": "cpu", "workers": 2, "num_cpus": 0.1}],
    }
    path = tmp_path / "haif.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    haif = str(Path(sys.executable).parent / "haif")
    proc = subprocess.Popen(
        [haif, "serve", "--config", str(path)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        read_until_served(proc)
        workers = wait_for(lambda: len(w := _workers_of(proc.pid)) == 2 and w, 60, 0.5, "two worker processes")
        pids = [w.pid for w in workers]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    left = wait_for(
        lambda: not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
        30, 0.5, "the worker processes to exit",
    )
    assert left
