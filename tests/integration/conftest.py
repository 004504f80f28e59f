"""One Ray cluster and one HAIF deployment per test session (fixtures only; helpers in tests/support).

The cluster declares 2 logical GPUs (GPU pinning is tested without a GPU). HAIF is
deployed the way an operator deploys onto an existing cluster:
``ray job submit --working-dir . -- python serve_app.py --config tests/configs/integration.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import services
from tests.support.artifacts import ArtifactSetup, MotoS3, build_artifact_setup
from tests.support.deployment import CONFIG, Deployment, deployment_from_output, submit_job
from tests.support.net import free_port, http_up
from tests.support.oidc_provider import AUDIENCE, OidcProvider
from tests.support.otlp import OtlpReceiver
from tests.support.waiting import wait_for
from tests.support.webhook import WebhookReceiver


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    import ray

    # Job entrypoints run `python` from the PATH the cluster was started with.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
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
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 1024**3,
        },
    )
    ray.init(address=cluster.address, namespace="haif-test", log_to_driver=False)
    url = f"http://127.0.0.1:{dashboard_port}"
    wait_for(lambda: http_up(f"{url}/api/version"), 60, 0.5, "the Ray dashboard")
    yield url
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """A real S3 endpoint: moto's threaded server on a free loopback port, for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def artifact_setup(moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> ArtifactSetup:
    """The session's artifact store (tests/support/artifacts.py) the deployment serves from."""
    return build_artifact_setup(moto_s3, tmp_path_factory.mktemp("artifacts"))


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
    from tests.support.p2p import Testnet

    with Testnet() as net:
        yield net.bootstrap


@pytest.fixture(scope="session")
def oidc_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A real OpenID provider (the npm oidc-provider) the deployment trusts (auth.oidc)."""
    server = OidcProvider(tmp_path_factory.mktemp("oidc-issuer"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def haif(
    ray_cluster: str,
    store_env: dict[str, str],
    webhook: WebhookReceiver,
    artifact_setup: ArtifactSetup,
    telemetry_env: dict[str, str],
    testnet: list[str],
    oidc_issuer: OidcProvider,
) -> Deployment:
    # A free port, so that test sessions (and a running `make serve`) never collide.
    port = free_port()
    # The P2P shim on the local testnet, as `HAIF_P2P__ENABLED=true HAIF_P2P__BOOTSTRAP=...` does.
    p2p_env = {"HAIF_P2P__ENABLED": "true", "HAIF_P2P__BOOTSTRAP": json.dumps(testnet)}
    # JWTs of the test's OpenID provider beside HAIF's keys, as an operator sets it.
    oidc = [{"issuer": oidc_issuer.issuer, "audience": AUDIENCE, "tenant_claim": "haif_tenant"}]
    env = {"HAIF_SERVER__PORT": str(port), "HAIF_USAGE__WEBHOOK_URL": webhook.url, **store_env,
           **artifact_setup.env, **telemetry_env, **p2p_env, "HAIF_AUTH__OIDC": json.dumps(oidc)}
    out = submit_job(ray_cluster, "python", "serve_app.py", "--config", CONFIG, env=env)
    return deployment_from_output(out, ray_cluster)


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
