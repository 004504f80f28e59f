"""The Orchestrator's composition root: its collaborators, built in one place.

``compose`` builds what one Serve replica of the Orchestrator is made of, from the
config and the replica's context (its application, its rank: rank 0 leads); a test
builds ``OrchestratorParts`` from fakes instead and hands them to ``Orchestrator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from haif.orchestrator.control.autoscaling import AutoscaleControl
from haif.orchestrator.control.canary import CanaryControl
from haif.orchestrator.control.drains import DrainControl
from haif.orchestrator.control.rollouts import RolloutControl
from haif.orchestrator.control.store import ControlStore
from haif.orchestrator.fleet_state import FleetState, plan_fleets
from haif.orchestrator.health import HealthMonitor
from haif.orchestrator.rollout import CanaryJudge
from haif.telemetry import tracing
from haif.telemetry.logs import install_json_logs
from haif.telemetry.metrics import MetricsTarget, OrchestratorMetrics, ProcessMetrics

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from haif.config import HaifConfig


@dataclass
class OrchestratorParts:
    """What one Orchestrator replica is made of, layer by layer (see ``haif.orchestrator``)."""

    fleet: FleetState
    health: HealthMonitor
    rollouts: RolloutControl
    canary: CanaryControl
    autoscaler: AutoscaleControl
    drains: DrainControl
    store: ControlStore | None = None  # the auth epoch's source (rollouts read their own)

    @classmethod
    def of(
        cls,
        config: HaifConfig,
        fleet: FleetState,
        metrics: OrchestratorMetrics,
        store: ControlStore | None = None,
        p2p: DeploymentHandle | None = None,
    ) -> OrchestratorParts:
        """The health monitor and the control policies over ``fleet``."""
        judge = CanaryJudge(config.rollouts)  # shared: a version rolled out no more is forgotten
        return cls(
            fleet=fleet,
            health=HealthMonitor(fleet, config.resilience, p2p),
            rollouts=RolloutControl(fleet, store, judge),
            canary=CanaryControl(fleet, store, judge, metrics),
            autoscaler=AutoscaleControl(fleet, config.resilience, metrics),
            drains=DrainControl(fleet, store, config.resilience, config.rollouts.poll_s),
            store=store,
        )


def compose(config: HaifConfig, p2p: DeploymentHandle | None = None) -> OrchestratorParts:
    """The collaborators of a Serve replica of the Orchestrator: the fleet planned on the
    cluster's GPUs, the store's rollouts applied to it, the running workers adopted (on
    the leader, the missing ones started), and the policies over it. First, the
    replica's tracing and JSON logs."""
    import ray
    from ray import serve

    from actors.worker import ModelWorker

    context = serve.get_replica_context()
    tracing.setup_tracing(
        config.telemetry, "orchestrator", region=config.regions[0].name, instance=context.replica_id.unique_id
    )
    install_json_logs(config.telemetry, "orchestrator")
    leader = getattr(context.rank, "rank", 0) == 0
    target = MetricsTarget.from_config(config)
    store = ControlStore.open(config)
    fleet = FleetState(
        config,
        plan_fleets(config, ray.cluster_resources().get("GPU", 0.0)),
        app=context.app_name,
        leader=leader,
        worker=ray.remote(ModelWorker),
        metrics_target=target,
    )
    # The store down at start: the config's versions.
    fleet.start((store.read_rollouts() if store is not None else None) or {})
    metrics = OrchestratorMetrics(ProcessMetrics.start(target, "orchestrator"))
    if leader:  # one fleet, counted once (the stand-by replicas see the same workers)
        metrics.watch_workers(fleet.worker_samples)
        metrics.watch_rollouts(fleet.weight_samples)
    return OrchestratorParts.of(config, fleet, metrics, store, p2p)
