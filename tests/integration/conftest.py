"""One Ray cluster and one HAIF deployment per test session.

The cluster declares 2 logical GPUs (GPU pinning is tested without a GPU). HAIF is
deployed the way an operator deploys onto an existing cluster:
``ray job submit --working-dir . -- python serve_app.py --config tests/configs/integration.yaml``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.artifact_fixtures import ArtifactSetup, artifact_setup, moto_s3  # noqa: F401

from tests import services
from tests.otlp import OtlpReceiver
from tests.webhook import WebhookReceiver

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/configs/integration.yaml"
DEPLOY_TIMEOUT_S = 900
AGENT_WAIT_S = 60


@dataclass(frozen=True)
class Deployment:
    url: str
    api_key: str
    dashboard_url: str
    app_name: str = "haif"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HAIF_SERVE_START_TIMEOUT_S = 420


def read_until_served(proc: subprocess.Popen, timeout_s: float = HAIF_SERVE_START_TIMEOUT_S) -> list[str]:
    """Read a `haif serve` process's output until it prints its API key (it is serving);
    fail with the last of its output if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if line.startswith("API key:"):
            break
    assert lines and lines[-1].startswith("API key:"), "".join(lines[-40:])
    return lines


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    import ray

    # Job entrypoints run `python` from the PATH the cluster was started with.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    from ray.cluster_utils import Cluster

    dashboard_port = _free_port()
    # Free ports for the dashboard and its job agent (ray.init would take the agent's
    # fixed default), so that test sessions running side by side do not collide.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 8,
            "num_gpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": _free_port(),
            "object_store_memory": 1024**3,
        },
    )
    ray.init(address=cluster.address, namespace="haif-test", log_to_driver=False)
    url = f"http://127.0.0.1:{dashboard_port}"
    wait_for(lambda: _up(f"{url}/api/version"), 60, 0.5, "the Ray dashboard")
    yield url
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _up(url: str) -> bool:
    # Any HTTP answer means the dashboard is serving (it may demand Ray's auth token).
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def submit_job(
    dashboard_url: str,
    *entrypoint: str,
    timeout_s: float = DEPLOY_TIMEOUT_S,
    env: dict[str, str] | None = None,
    working_dir: Path | None = ROOT,
    agent_wait_s: float = AGENT_WAIT_S,
) -> str:
    """Run ``ray job submit [--working-dir DIR] -- ENTRYPOINT`` and return its output."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard_url]
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
        time.sleep(1.0)
    if proc.returncode != 0:
        raise AssertionError(f"job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def pg_server() -> str:
    """A PostgreSQL server (HAIF_TEST_DATABASE_URL, the local one, or one started here)."""
    with services.postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def pg_url(pg_server: str) -> str:
    """This session's own database, shared by the deployment and the tests; dropped at the end."""
    with services.fresh_database(pg_server) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    with services.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> str:
    """This session's own key prefix in Redis; its keys are deleted at the end."""
    prefix = f"haif-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    services.drop_redis_keys(redis_url, prefix)


@pytest.fixture(scope="session")
def webhook() -> WebhookReceiver:
    """The billing webhook of the deployment: fails its first two deliveries on purpose."""
    with WebhookReceiver(fail_first=2) as receiver:
        yield receiver


@pytest.fixture(scope="session")
def otlp() -> OtlpReceiver:
    """The OTLP/HTTP trace receiver every process of the deployment exports to."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def telemetry_env(otlp: OtlpReceiver) -> dict[str, str]:
    """HAIF's telemetry config: export to ``otlp`` every 200 ms, debug logs.

    Through the config rather than OTEL_* variables in the job's environment: those
    would reach Ray's own processes of the session too (its Serve controller and proxy).
    """
    return {
        "HAIF_TELEMETRY__OTLP_ENDPOINT": otlp.endpoint,
        "HAIF_TELEMETRY__OTLP_PROTOCOL": "http/protobuf",
        "HAIF_TELEMETRY__EXPORT_INTERVAL_MS": "200",
        "HAIF_TELEMETRY__LOG_LEVEL": "DEBUG",
    }


@pytest.fixture(scope="session")
def store_env(pg_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """HAIF_* variables that point a process at this session's PostgreSQL and Redis."""
    return {
        "HAIF_DATABASE__URL": pg_url,
        "HAIF_REDIS__URL": redis_url,
        "HAIF_REDIS__KEY_PREFIX": redis_prefix,
    }


@pytest.fixture(scope="session")
def testnet() -> list[str]:
    """A local hyperdht testnet (127.0.0.1) the deployment's P2P shim joins: its bootstrap."""
    from tests.p2p import Testnet

    with Testnet() as net:
        yield net.bootstrap


@pytest.fixture(scope="session")
def haif(
    ray_cluster: str,
    store_env: dict[str, str],
    webhook: WebhookReceiver,
    artifact_setup: ArtifactSetup,
    telemetry_env: dict[str, str],
    testnet: list[str],
) -> Deployment:
    # A free port, so that test sessions (and a running `make serve`) never collide.
    port = _free_port()
    # The P2P shim on the local testnet, as `HAIF_P2P__ENABLED=true HAIF_P2P__BOOTSTRAP=...` does.
    p2p_env = {"HAIF_P2P__ENABLED": "true", "HAIF_P2P__BOOTSTRAP": json.dumps(testnet)}
    env = {"HAIF_SERVER__PORT": str(port), "HAIF_USAGE__WEBHOOK_URL": webhook.url, **store_env,
           **artifact_setup.env, **telemetry_env, **p2p_env}
    out = submit_job(ray_cluster, "python", "serve_app.py", "--config", CONFIG, env=env)
    url = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("URL: "))
    key = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("API key: "))
    return Deployment(url=url.strip(), api_key=key.strip(), dashboard_url=ray_cluster)


def haif_cli(store_env: dict[str, str], *args: str) -> str:
    """Run ``haif ARGS --config tests/configs/integration.yaml`` against this session's stores."""
    cmd = [str(Path(sys.executable).parent / "haif"), *args, "--config", CONFIG]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **store_env},
                          timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"haif {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def http(haif: Deployment):  # noqa: ANN201
    with httpx.Client(base_url=haif.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def auth(haif: Deployment) -> dict[str, str]:
    return haif.headers()


@pytest.fixture(scope="session")
def orchestrator(haif: Deployment):  # noqa: ANN201
    from ray import serve

    return serve.get_deployment_handle("Orchestrator", app_name=haif.app_name)
