"""Ray Serve wiring of HAIF: the Gateway (HTTP ingress, routes to the worker actors) and the
Orchestrator (control plane: owns the workers, publishes the routing table).

Ways to deploy:

* ``haif serve [--config PATH]`` (starts a local Ray cluster unless RAY_ADDRESS names one);
* ``serve run serve_app:app`` (config from ``$HAIF_CONFIG`` or ``configs/local.yaml``);
* ``ray job submit --working-dir . -- python serve_app.py --config configs/local.yaml``
  (with ``RAY_AUTH_MODE=token`` in the shell, and ``HAIF_BASE_DIR`` so that the state does
  not live in Ray's copy of the working directory: docs/deploy.md).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ray import serve

from haif.bootstrap import prepare
from haif.config import HaifConfig, load_config
from haif.gateway.deployment import Gateway
from haif.ingress import check_ingress, wait_ready
from haif.orchestrator.deployment import Orchestrator
from haif.telemetry.tracing import otel_environment

if TYPE_CHECKING:
    from ray.serve import Application

# Serve replicas are I/O-bound coordinators: they reserve no CPU, so that the
# CPUs of the cluster go to the worker actors that run models. Their code is
# all-async (nothing blocks the loop), so it runs on the replica's main event loop:
# this saves a thread/loop crossing per request.
_COORDINATOR_OPTIONS = {
    "num_cpus": 0,
    "runtime_env": {
        "env_vars": {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        }
    },
}


def _coordinator_options(config: HaifConfig) -> dict[str, Any]:
    resource = config.server.control_resource
    if resource is None:
        return _COORDINATOR_OPTIONS
    # Pinned to the control-plane nodes: losing a model node never takes a coordinator.
    return {**_COORDINATOR_OPTIONS, "resources": {resource: 0.001}}


def _with_otel_environment(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with this process's OTEL_* variables added to the runtime_env.

    Serve replicas with a runtime_env of their own do not inherit the deploying job's
    variables; the worker actors inherit the Orchestrator's.
    """
    env = otel_environment()
    if not env:
        return options
    runtime_env = options.get("runtime_env", {})
    env_vars = {**env, **runtime_env.get("env_vars", {})}
    return {**options, "runtime_env": {**runtime_env, "env_vars": env_vars}}


def build_app(config: HaifConfig) -> Application:
    """The Serve application graph for ``config`` (already prepared): the Gateway is the
    ingress (its FastAPI app is the Bridge); the Orchestrator is bound to it for the
    routing table only."""
    server = config.server
    options = _with_otel_environment(_coordinator_options(config))
    logging = {
        "enable_access_log": server.access_log,
        "encoding": "JSON" if config.telemetry.json_logs else "TEXT",
    }
    p2p = None
    if config.p2p.enabled:
        from haif.p2p.deployment import P2PShim

        # One replica: one DHT identity (the key seed in state_dir), one sidecar.
        p2p = serve.deployment(
            P2PShim, name="P2PShim", logging_config=logging, num_replicas=1,
            max_ongoing_requests=max(64, 2 * config.p2p.max_concurrent), ray_actor_options=options,
        ).bind(config)
    orchestrator = serve.deployment(
        Orchestrator,
        name="Orchestrator",
        logging_config=logging,
        num_replicas=server.orchestrator_replicas,
        # Every Gateway replica holds one long-poll open at all times.
        max_ongoing_requests=max(64, 4 * server.gateway_replicas),
        ray_actor_options=options,
    ).bind(config, p2p=p2p)
    return serve.deployment(
        serve.ingress()(Gateway),
        name="Gateway",
        logging_config=logging,
        num_replicas=server.gateway_replicas,
        max_ongoing_requests=server.max_ongoing_requests,
        ray_actor_options=options,
    ).bind(config, orchestrator, p2p=p2p)


def deploy(config: HaifConfig, *, blocking: bool = False) -> HaifConfig:
    """Prepare ``config``, start Serve's HTTP ingress on its host/port and run the app.

    Raises:
        ConfigError: the cluster does not run the ingress ``config`` names (see haif.ingress).
    """
    config = prepare(config)
    check_ingress(config)
    serve.start(
        proxy_location=config.server.proxy_location,
        http_options={"host": config.server.host, "port": config.server.port},
    )
    serve.run(build_app(config), name=config.server.app_name, route_prefix="/", blocking=blocking)
    return config


def __getattr__(name: str) -> Any:
    # `serve run serve_app:app` reads this attribute; building it lazily keeps the
    # import free of side effects for `haif serve` and the tests.
    if name == "app":
        config = prepare(load_config())
        check_ingress(config)
        return build_app(config)
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deploy HAIF onto the current Ray cluster.")
    parser.add_argument("--config", default=None, help="config file (default: $HAIF_CONFIG or configs/local.yaml)")
    args = parser.parse_args(argv)
    config = deploy(load_config(args.config))
    url = f"http://{config.server.host}:{config.server.port}"
    wait_ready(url, timeout_s=600)
    print(f"URL: {url}", flush=True)
    if config.auth.dev_api_key:  # auth.dev_key: a production start prints no secret
        print(f"API key: {config.auth.dev_api_key}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
