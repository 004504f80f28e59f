"""`haif serve`: run the platform until Ctrl-C / SIGTERM, then stop what it started."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from haif.config import HaifConfig

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when our parent (e.g. `make`) dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass  # best effort; Ctrl-C and SIGTERM to this process still work


def run(config: HaifConfig, ready_timeout_s: float = 900.0) -> int:
    from haif.ingress import prepare_environment, wait_ready

    address = os.environ.get("RAY_ADDRESS") or config.ray.address
    owns_cluster = address is None
    if owns_cluster:
        prepare_environment(config)  # before Ray starts: the cluster's processes inherit it
    import ray
    from ray import serve

    from serve_app import deploy

    _die_with_parent()
    stop = threading.Event()
    ray.init(
        # "local": always a cluster of our own. ray.init() without an address would join
        # any cluster already running on this machine, and the serve.shutdown() below
        # would then stop someone else's applications.
        address=address or "local",
        namespace=config.ray.namespace,
        num_cpus=config.ray.num_cpus if owns_cluster else None,
        num_gpus=config.ray.num_gpus if owns_cluster else None,
        include_dashboard=config.ray.include_dashboard if owns_cluster else None,
        log_to_driver=True,
    )
    # After ray.init, which installs a handler of its own that aborts the process on
    # SIGTERM: the stop must reach the `finally` below, which stops what was started.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        config = deploy(config)
        url = f"http://{config.server.host}:{config.server.port}"
        status = wait_ready(url, ready_timeout_s)
        for name, model in status.get("models", {}).items():
            if model.get("state") != "ready":
                print(f"WARNING: model {name} is {model.get('state')}: {model.get('error')}", flush=True)
        print(f"URL: {url}", flush=True)
        if config.auth.dev_api_key:  # auth.dev_key: a production start prints no secret
            print(f"API key: {config.auth.dev_api_key}", flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping HAIF ...", flush=True)
        return 0
    finally:
        try:
            if owns_cluster:
                serve.shutdown()
            else:
                serve.delete(config.server.app_name)
        finally:
            try:
                # The workers are detached actors: the Orchestrator stops them when the app
                # is deleted; this catches any it could not (killed before it could).
                from haif.orchestrator.fleet import stop_workers

                stop_workers(config.server.app_name, config.ray.namespace)
            finally:
                ray.shutdown()
