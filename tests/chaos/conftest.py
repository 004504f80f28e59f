"""A three-node local Ray cluster and a HAIF deployment that the chaos tests break.

The head node runs the coordinators (custom resource ``haif-control``) and Serve's only
HTTP proxy; nodes ``a`` and ``b`` are the two regions' model nodes. HAIF is deployed
as an operator deploys it (``ray job submit ... serve_app.py --config
tests/configs/chaos.yaml``) against this session's own PostgreSQL database and Redis
key prefix. These tests run in their own pytest process (``make test`` runs the chaos
tier after the others), since a process joins one Ray cluster at a time.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from tests.support import services
from tests.support.deployment import (
    CHAOS_CONFIG,
    ROOT,
    ChaosCluster,
    Deployment,
    deployment_from_output,
    submit_job,
)
from tests.support.net import free_port, http_up
from tests.support.waiting import wait_for

AGENT_WAIT_S = 300  # a loaded 2-core machine can take minutes to start the job agent


@pytest.fixture(scope="session")
def chaos_cluster() -> ChaosCluster:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    dashboard_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {"haif-control": 100},
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 512 * 1024**2,
        },
    )
    nodes = {
        region: cluster.add_node(
            num_cpus=2, resources={f"region-{region}": 10}, object_store_memory=256 * 1024**2
        )
        for region in ("a", "b")
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="haif-chaos", log_to_driver=False)
    url = f"http://127.0.0.1:{dashboard_port}"
    wait_for(lambda: http_up(f"{url}/api/version"), 60, 0.5, "the Ray dashboard")
    yield ChaosCluster(cluster, url, nodes)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def chaos_pg_url() -> str:
    with services.postgres_server() as server, services.fresh_database(server, "haif_chaos") as url:
        yield url


@pytest.fixture(scope="session")
def chaos_store_env(chaos_pg_url: str) -> dict[str, str]:
    prefix = f"haif-chaos-{uuid.uuid4().hex[:8]}"
    with services.redis_server() as redis_url:
        yield {
            "HAIF_DATABASE__URL": chaos_pg_url,
            "HAIF_REDIS__URL": redis_url,
            "HAIF_REDIS__KEY_PREFIX": prefix,
        }
        services.drop_redis_keys(redis_url, prefix)


@pytest.fixture(scope="session")
def chaos_testnet() -> list[str]:
    """A local hyperdht testnet (127.0.0.1) the deployment's P2P shim joins: its bootstrap."""
    from tests.support.p2p import Testnet

    with Testnet() as net:
        yield net.bootstrap


@pytest.fixture(scope="session")
def chaos_haif(
    chaos_cluster: ChaosCluster,
    chaos_store_env: dict[str, str],
    chaos_testnet: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Deployment:
    env = {
        "HAIF_SERVER__PORT": str(free_port()),
        "HAIF_BASE_DIR": str(tmp_path_factory.mktemp("haif-chaos")),
        # The P2P shim (chaos.yaml's p2p section) on the local testnet.
        "HAIF_P2P__BOOTSTRAP": json.dumps(chaos_testnet),
        **chaos_store_env,
    }
    # No --working-dir: on several raylets of one host, their runtime-env agents unpack a
    # working-dir package into one shared session directory and race. HAIF is installed
    # in the venv every node uses, so `python -m serve_app` needs no package.
    out = submit_job(
        chaos_cluster.dashboard_url, "python", "-m", "serve_app", "--config", str(ROOT / CHAOS_CONFIG),
        env=env, working_dir=None, agent_wait_s=AGENT_WAIT_S,
    )
    return deployment_from_output(out, chaos_cluster.dashboard_url)


@pytest.fixture(scope="session")
def chaos_orchestrator(chaos_haif: Deployment):  # noqa: ANN201
    from ray import serve

    return serve.get_deployment_handle("Orchestrator", app_name=chaos_haif.app_name)


@pytest.fixture(scope="session")
def chaos_gateway(chaos_haif: Deployment):  # noqa: ANN201
    from ray import serve

    return serve.get_deployment_handle("Gateway", app_name=chaos_haif.app_name)
