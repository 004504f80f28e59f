"""HAIF's P2P shim: Hyperswarm RPC peers call HAIF, and HAIF calls remote P2P workers.

The real ``@hyperswarm/rpc`` (on hyperdht, Noise, UDX) runs in a Node sidecar
(``sidecar/``); Python supervises it and speaks to it over a Unix socket with
length-prefixed JSON frames. The frame protocol, the methods, streaming and the errors a
peer sees are described in ``sidecar/README.md``.

* :class:`Sidecar` starts, supervises and restarts the sidecar, hands each inbound
  request to an :class:`InboundHandler`, and calls remote peers (:meth:`Sidecar.call`,
  :meth:`Sidecar.stream`).
* :mod:`haif.p2p.keys`: the key seed file and its public key, without Node.
* :mod:`haif.p2p.errors`: HAIF errors as P2P error codes, and back.
"""

from __future__ import annotations

from haif.p2p.handler import INBOUND_METHODS, WORKER_METHODS, InboundHandler
from haif.p2p.sidecar import Sidecar, SidecarState, SidecarStatus

__all__ = [
    "INBOUND_METHODS",
    "WORKER_METHODS",
    "InboundHandler",
    "Sidecar",
    "SidecarState",
    "SidecarStatus",
]
