"""The worker fleet: one slot per worker the config asks for, and the actor that fills it.

Workers are detached, named Ray actors in HAIF's namespace, so that they outlive the
Orchestrator replica that started them: a replica that dies and is restarted by Serve
finds them by name and adopts them (no reload, the same actors). A worker's name says
which slot it fills and which config it was started from::

    <app>/<model>/<region>[/<tier>]/<index>@<digest of the version's config>

so that a redeploy with another config for a model starts new workers, and the old ones
(names no slot wants) are stopped; two versions of a model (a rollout's stable and
canary) have different digests, so their workers live side by side. How many workers
a pool (a region and tier of one version) has is not in the name: the fleet is what
runs (``parse_worker_name``), grown and shrunk by the autoscaler. Stopping HAIF (``serve
shutdown``, deleting the app, ``haif serve`` ending) stops every worker of the app
(``stop_workers``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from haif.orchestrator.table import SHARED_TIER, WorkerRoute

if TYPE_CHECKING:
    from haif.config import HaifConfig, ModelConfig

logger = logging.getLogger("haif.orchestrator")

# What a call to a worker that is gone (died, or cannot be reached) raises.
ACTOR_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


# Fields of a model that say how many workers it has, not what a worker is.
_FLEET_FIELDS = frozenset({"workers", "autoscaling", "drain_timeout_s"})


def config_digest(config: HaifConfig, model: ModelConfig) -> str:
    """What a worker of ``model`` (one version of it) is built from: a new value means new
    workers. The fleet's size is not part of it (the autoscaler changes it)."""
    facts = (
        model.model_dump_json(exclude=set(_FLEET_FIELDS)),
        config.limits.max_prompt_tokens,
        config.artifacts.model_dump_json(),
        config.telemetry.model_dump_json(),
    )
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:10]


@dataclass
class Slot:
    """One worker position of the fleet; a replacement actor takes over the same slot."""

    name: str  # the actor's name (see the module docstring)
    model: ModelConfig
    region: str
    tier: str
    index: int
    actor: Any = None  # ray.actor.ActorHandle
    actor_id: str | None = None
    load_ref: Any | None = None  # ObjectRef of the pending load() call, None once settled
    state: str = "pending"  # pending | loading | ready | draining | failed | dead
    error: str | None = None
    load: int = 0  # requests in flight at the last probe
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded at the last probe
    load_started: float = field(default_factory=time.monotonic)
    probe_failures: int = 0
    deaths: int = 0
    ready_since: float | None = None
    died_at: float | None = None
    replace_at: float | None = None
    version: str = "1"  # the model version it serves
    # To go: drained as soon as its pool has another ready worker (a scale-down, a
    # `haif workers drain` once its replacement is ready), then stopped.
    retire: bool = False
    retire_reason: str | None = None
    drain_started: float | None = None

    @property
    def pool(self) -> tuple[str, str]:
        return (self.region, self.tier)

    @property
    def where(self) -> str:
        return self.region if self.tier == SHARED_TIER else f"{self.region}/{self.tier}"

    @property
    def worker_id(self) -> str:
        """The id requests, spans and job rows name: the slot and its actor."""
        base = f"{self.model.name}/{self.where}/{self.index}"
        return f"{base}#{self.actor_id[:8]}" if self.actor_id else base

    def route(self) -> WorkerRoute | None:
        if self.actor is None:
            return None
        return WorkerRoute(
            worker_id=self.worker_id,
            actor=self.actor,
            region=self.region,
            tier=self.tier,
            state=self.state,
            capacity=self.model.max_concurrency,
            load=self.load,
            adapters=self.adapters,
            version=self.version,
        )

    def adopt(self, actor: Any) -> None:
        self.actor = actor
        self.actor_id = actor._actor_id.hex()  # noqa: SLF001 - Ray has no public accessor on a handle
        self.state, self.error, self.probe_failures = "loading", None, 0
        self.load_started, self.load, self.adapters = time.monotonic(), 0, frozenset()

    def mark_dead(self, reason: str, replacement_backoff_max_s: float) -> None:
        """Record a dead worker; it is replaced after a backoff that doubles with each death
        of this slot (a worker that keeps dying is not restarted hot)."""
        if self.state == "dead":
            return
        now = time.monotonic()
        if self.ready_since is not None and now - self.ready_since >= replacement_backoff_max_s:
            self.deaths = 0  # it ran longer than the longest backoff: not a crash loop
        self.state, self.error, self.ready_since, self.load_ref = "dead", reason, None, None
        self.deaths += 1
        self.died_at = now
        delay = min(replacement_backoff_max_s, 0.5 * 2 ** (self.deaths - 2)) if self.deaths > 1 else 0.0
        self.replace_at = now + delay
        logger.error("worker %s is dead (%s); replacement in %.1fs", self.worker_id, reason, delay)


def pools_of(config: HaifConfig, model: ModelConfig) -> list[tuple[str, str]]:
    """The (region, tier) pools ``model`` runs: each region of it, the shared tier and each
    dedicated tenant's."""
    return [
        (region.name, tier)
        for region in config.model_regions(model)
        for tier in [SHARED_TIER, *model.dedicated_tenants]
    ]


def new_slot(config: HaifConfig, model: ModelConfig, region: str, tier: str, index: int) -> Slot:
    """Slot ``index`` of ``model``'s (a version of it) pool ``region``/``tier``."""
    slot = Slot(name="", model=model, region=region, tier=tier, index=index, version=model.version)
    slot.name = f"{config.server.app_name}/{model.name}/{slot.where}/{index}@{config_digest(config, model)}"
    return slot


def running_indices(names: list[str], template: Slot) -> list[int]:
    """The indices of the running workers (``names``) of ``template``'s pool and version."""
    prefix = template.name[: template.name.rindex("/") + 1]
    suffix = template.name[template.name.rindex("@"):]
    found = []
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix):
            middle = name[len(prefix): -len(suffix)]
            if middle.isdigit():
                found.append(int(middle))
    return sorted(found)


def slots_of(config: HaifConfig, model: ModelConfig, per_pool: int | None = None) -> list[Slot]:
    """``per_pool`` slots (default: ``model.initial_workers``) in each pool of ``model``."""
    count = model.initial_workers if per_pool is None else per_pool
    return [
        new_slot(config, model, region, tier, i)
        for region, tier in pools_of(config, model)
        for i in range(count)
    ]


def find_worker(name: str, namespace: str) -> Any | None:
    """The live actor named ``name``, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def app_workers(app: str, namespace: str) -> list[str]:
    """The names of every worker actor of ``app`` in ``namespace``."""
    from ray.util import list_named_actors

    return [
        a["name"] for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace and a["name"].startswith(f"{app}/")
    ]


def stop_worker(name: str, namespace: str) -> bool:
    """Kill the worker named ``name`` (and its tensor-parallel placement group)."""
    actor = find_worker(name, namespace)
    if actor is not None:
        ray.kill(actor, no_restart=True)
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import get_placement_group

    try:
        group = get_placement_group(f"{name}/pg")
    except ValueError:
        group = None
    if group is not None and placement_group_table(group).get("state") != "REMOVED":
        remove_placement_group(group)
    return actor is not None


def stop_workers(app: str, namespace: str, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Stop every worker of ``app`` whose name is not in ``keep``; their names."""
    stopped = []
    for name in app_workers(app, namespace):
        if name not in keep and stop_worker(name, namespace):
            stopped.append(name)
    return stopped


@dataclass
class RemoteSlot:
    """A remote P2P worker of a model (``p2p_workers``): probed like a local one, never
    started or replaced by HAIF (its operator runs it: ``haif p2p worker``)."""

    peer: str  # its Noise public key, 64 hex
    model: ModelConfig
    region: str
    state: str = "loading"  # loading (not answered yet) | ready | dead
    error: str | None = None
    load: int = 0
    probe_failures: int = 0

    @property
    def worker_id(self) -> str:
        return f"{self.model.name}/p2p/{self.peer[:12]}"

    def route(self, version: str) -> WorkerRoute:
        """Its row of the table; it serves ``version`` (the model's stable one: its operator
        runs whatever it runs, HAIF does not roll it out)."""
        return WorkerRoute(
            worker_id=self.worker_id, actor=None, region=self.region, tier=SHARED_TIER,
            state=self.state, capacity=self.model.max_concurrency, load=self.load, peer=self.peer,
            version=version,
        )


async def resolve(ref: Any) -> Any:
    """Await an ObjectRef as a coroutine (what ``asyncio.wait_for`` and ``gather`` take)."""
    return await ref
