"""A HAIF deployment as the tests see it, and the processes that make one.

HAIF is deployed the way an operator deploys onto an existing cluster
(``ray job submit --working-dir . -- python serve_app.py --config ...``); ``haif serve``
is read until it prints its API key; the ``haif`` CLI runs against a session's stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/configs/integration.yaml"
CHAOS_CONFIG = "tests/configs/chaos.yaml"
DEPLOY_TIMEOUT_S = 900
AGENT_WAIT_S = 60
HAIF_SERVE_START_TIMEOUT_S = 420
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Deployment:
    url: str
    api_key: str
    dashboard_url: str
    app_name: str = "haif"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class ChaosCluster:
    """The chaos tier's three-node cluster: the head and one node per region."""

    cluster: Any  # ray.cluster_utils.Cluster
    dashboard_url: str
    nodes: dict[str, Any]  # region name → its node


def deployment_from_output(out: str, dashboard_url: str) -> Deployment:
    """The deployment whose ``URL:`` and ``API key:`` lines ``out`` (a job's output) holds."""
    url = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("URL: "))
    key = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("API key: "))
    return Deployment(url=url.strip(), api_key=key.strip(), dashboard_url=dashboard_url)


def read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    """Read a process's output until a line holds ``marker``; fail with the last of its
    output if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout_s}s:\n{''.join(lines[-60:])}")


def read_until_served(proc: subprocess.Popen, timeout_s: float = HAIF_SERVE_START_TIMEOUT_S) -> list[str]:
    """Read a `haif serve` process's output until it prints its API key (it is serving)."""
    return read_until(proc, "API key:", timeout_s)


def submit_job(
    dashboard_url: str,
    *entrypoint: str,
    timeout_s: float = DEPLOY_TIMEOUT_S,
    env: dict[str, str] | None = None,
    working_dir: Path | None = ROOT,
    agent_wait_s: float = AGENT_WAIT_S,
) -> str:
    """Run ``ray job submit [--working-dir DIR] -- ENTRYPOINT`` and return its output."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard_url]
    if working_dir is not None:
        cmd += ["--working-dir", str(working_dir)]
    if env:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env})]
    cmd += ["--", *entrypoint]
    # The dashboard answers before its job agent is up; until then a submission is refused.
    deadline = time.monotonic() + agent_wait_s
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        agent_missing = "No available agent to submit job" in proc.stdout + proc.stderr
        if proc.returncode == 0 or not agent_missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)  # between retries of a refused submission, not a wait for a result
    if proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def haif_cli(store_env: dict[str, str], *args: str, config: str = CONFIG) -> str:
    """Run ``haif ARGS --config CONFIG`` (the integration tier's) against a session's stores."""
    cmd = [str(BIN / "haif"), *args, "--config", config]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **store_env},
                          timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"haif {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout
