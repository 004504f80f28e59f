"""The routing table: what the Orchestrator publishes and every Gateway replica holds.

The Orchestrator (control plane) owns the worker fleet; each Gateway replica (data
plane) routes requests to the workers itself. Between them travels one value, a
``RoutingTable``: per model, its workers with tier, region, state, capacity and the load
they last reported. Gateways hold it in memory and refresh it by long-poll
(``TableClient``, the pattern of Ray Serve's ``LongPollClient``/``LongPollHost``): the
Orchestrator's ``listen(version)`` answers as soon as the table differs from the version
the caller holds, or after ``refresh_s`` with the current loads. Nothing on a request's
path waits for the Orchestrator: a Gateway whose Orchestrator is down (killed, being
restarted by Serve) keeps routing on the last table it got.

``version`` is a digest of the routing facts (which workers, their states and
capacities), not of the loads or of the LoRA adapters each worker has loaded (they change
with traffic and travel with the loads), so that every Orchestrator replica, looking at the same
fleet, publishes the same version, and a Gateway that asks one replica and then another
is not sent a "new" table each time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("haif.gateway")

SHARED_TIER = "shared"
# A Gateway that cannot reach the Orchestrator retries this often (doubling up to the max).
LISTEN_RETRY_INITIAL_S = 0.1
LISTEN_RETRY_MAX_S = 2.0
# A long-poll that has not answered this long after its own timeout is abandoned and sent again.
LISTEN_GRACE_S = 30.0


@dataclass(frozen=True)
class WorkerRoute:
    """One worker as the Gateways see it."""

    worker_id: str  # "<model>/<region>[/<tier>]/<index>#<actor id>": unique per actor
    actor: Any  # ray.actor.ActorHandle
    region: str
    tier: str
    state: str  # loading | ready | draining | failed | dead
    capacity: int  # requests it accepts at once (max_concurrency)
    load: int = 0  # requests in flight at its last probe, from every Gateway
    peer: str | None = None  # a remote P2P worker's public key (``actor`` is None then)
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded at its last probe
    version: str = "1"  # the model version it serves

    def facts(self) -> tuple[Any, ...]:
        # Not load, not adapters: volatile, they must not make a new table version.
        return (self.worker_id, self.region, self.tier, self.state, self.capacity, self.peer, self.version)


@dataclass(frozen=True)
class ModelRoutes:
    """One model: its kind, its workers and, when it cannot serve, why."""

    name: str
    kind: str  # generate | embed
    workers: tuple[WorkerRoute, ...] = ()
    device: str = "cpu"  # where its workers run: gpu | cpu
    error: str | None = None  # the last load failure of its workers
    unplaceable: str | None = None  # the model cannot be placed at all (no GPU...)
    replacing: bool = False  # dead workers are being replaced: requests wait for one
    ever_ready: bool = False
    # The traffic split: (version, percent) of the versions that take new requests, the
    # percents adding up to 100. A version is in it only once its workers are ready.
    weights: tuple[tuple[str, int], ...] = ()
    stable: str = "1"  # the version requests fall back to
    # Scaled to zero (autoscaling.min_workers 0, no worker now): a request waits for the
    # worker its demand starts, within its deadline, instead of failing.
    scaled_to_zero: bool = False
    # The autoscaler's last decision, for `haif status`: the leader's (a stand-by has none),
    # so, like the loads, not a routing fact.
    autoscaler: str | None = None

    def facts(self) -> tuple[Any, ...]:
        return (
            self.name, self.kind, self.device, self.error, self.unplaceable, self.replacing, self.ever_ready,
            self.weights, self.stable, self.scaled_to_zero, tuple(w.facts() for w in self.workers),
        )

    def version_for(self, key: str | None, draw: float) -> str:
        """The version a request goes to: ``key`` (an Idempotency-Key or the request's
        ``user``) picks the same version for as long as the weights stay; without a key,
        ``draw`` (uniform in [0, 1)) does."""
        if len(self.weights) < 2:
            return self.weights[0][0] if self.weights else self.stable
        if key is not None:
            digest = hashlib.sha256(f"{self.name}\x00{key}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64
        point, total = draw * 100, 0
        for version, weight in self.weights:
            total += weight
            if point < total:
                return version
        return self.weights[-1][0]


@dataclass(frozen=True)
class RoutingTable:
    models: dict[str, ModelRoutes] = field(default_factory=dict)
    version: str = ""
    published_at: float = 0.0  # time.time() of the Orchestrator that published it
    # The last auth change (a revoked token, a suspended tenant: ``auth_changes``): a new
    # one is a new version, so every Gateway's long-poll returns at once and the replica
    # drops its cached credentials (haif.gateway.auth).
    auth_epoch: int = 0

    @classmethod
    def of(cls, models: dict[str, ModelRoutes], auth_epoch: int = 0) -> RoutingTable:
        facts = (sorted(m.facts() for m in models.values()), auth_epoch)
        digest = hashlib.sha256(repr(facts).encode()).hexdigest()
        return cls(models=models, version=digest[:16], published_at=time.time(), auth_epoch=auth_epoch)


class TableHost:
    """The Orchestrator's side: the current table, and callers waiting for a new one."""

    def __init__(self) -> None:
        self.table = RoutingTable()
        self._changed = asyncio.Event()

    def publish(self, table: RoutingTable) -> None:
        """Make ``table`` current; wake the listeners when its routing facts changed (a
        new load figure alone waits for their refresh)."""
        changed = table.version != self.table.version
        self.table = table
        if changed:
            self._changed.set()
            self._changed = asyncio.Event()

    async def listen(self, version: str | None, timeout_s: float) -> RoutingTable:
        """The table as soon as its version is not ``version``, else after ``timeout_s``."""
        if version != self.table.version:
            return self.table
        changed = self._changed
        try:
            await asyncio.wait_for(changed.wait(), timeout_s)
        except TimeoutError:
            pass
        return self.table


class TableClient:
    """A Gateway replica's copy of the table, refreshed by long-poll in the background.

    Args:
        listen: ``await listen(version)`` returns the Orchestrator's table (a Serve handle
            call to ``Orchestrator.listen``).
        on_update: called with each new table (the router merges it into its state).
    """

    def __init__(
        self,
        listen: Callable[[str | None], Any],
        on_update: Callable[[RoutingTable], None],
        refresh_s: float = 1.0,
    ) -> None:
        self._listen = listen
        self._timeout_s = refresh_s + LISTEN_GRACE_S
        self._on_update = on_update
        self.table: RoutingTable | None = None
        self._first = asyncio.Event()
        self.failures = 0

    async def first(self, timeout_s: float) -> RoutingTable | None:
        """The table, waiting up to ``timeout_s`` for the first one (None if none came)."""
        if self.table is None:
            try:
                await asyncio.wait_for(self._first.wait(), timeout_s)
            except TimeoutError:
                return None
        return self.table

    async def run(self, stop: asyncio.Event) -> None:
        delay = LISTEN_RETRY_INITIAL_S
        while not stop.is_set():
            version = self.table.version if self.table is not None else None
            try:
                table = await asyncio.wait_for(self._listen(version), self._timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the Orchestrator is down or restarting: keep the last table
                self.failures += 1
                if self.failures == 1 or self.failures % 50 == 0:
                    logger.warning(
                        "routing table: the Orchestrator did not answer (%s); routing on the last "
                        "table (%d tries)", type(exc).__name__, self.failures,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_MAX_S)
                continue
            if self.failures:
                logger.info("routing table: the Orchestrator answers again")
            self.failures, delay = 0, LISTEN_RETRY_INITIAL_S
            self.table = table
            self._on_update(table)
            self._first.set()
