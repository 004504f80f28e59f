"""HAIF orchestrator: the control plane (the Orchestrator deployment) and the data-plane
half a Gateway replica runs (the router, its backends and breakers, the table client).

The Orchestrator is layered as Ray Serve's controller is over its state managers; a
layer imports only the ones below it, and nothing calls back into the deployment::

    4  deployment.Orchestrator    the Serve deployment: one control loop, and what the
       compose                    Gateways call (listen, demand, worker_died) and the tools
                                  (status, models, workers_info); its parts built in one place
    ----------------------------------------------------------------------------------------
    3  control.rollouts           the store's rollouts made the fleet's; canary state written back
       control.canary             the Gateways' outcomes judged; a failing canary rolled back
       control.autoscaling        each pool scaled by its autoscaler; scale from zero (demand)
       control.drains             `haif workers drain`; retired workers drained and stopped
       control.store              the metadata store as these policies read and write it
    ----------------------------------------------------------------------------------------
    2  health.HealthMonitor       probes (local actors, remote P2P workers), marks dead,
                                  replaces, follows the leader, reports the unplaced
    ----------------------------------------------------------------------------------------
    1  fleet_state.FleetState     the fleets and their actor slots: made, adopted, started,
                                  settled, grown, shrunk, stopped; the table published
       model_fleet                ModelFleet / VersionFleet: one model's versions as data
       fleet                      Slot / RemoteSlot, workers' names, finding and stopping actors
    ----------------------------------------------------------------------------------------
    0  rollout, autoscale,        pure policies and values: Intent and CanaryJudge,
       placement, table           PoolScaler, placement plans, the routing table and its host
"""
