"""`haif workers drain WORKER_ID`: ask the Orchestrator to drain one worker.

The request is a row in the metadata store of the config; the Orchestrator reads it
within a poll, stops sending the worker new requests, lets it finish what it has
(within the model's drain timeout), then stops it and records the outcome.
"""

from __future__ import annotations

from typing import Annotated

import typer

from haif.cli._common import ConfigOption, db_session

workers_app = typer.Typer(help="Worker actors of the running deployment.", no_args_is_help=True)


@workers_app.command("drain")
def drain(
    worker_id: Annotated[
        str, typer.Argument(help="The worker's id, as `haif status`, spans and job rows name it.")
    ],
    config: ConfigOption = None,
) -> None:
    """Drain a worker: no new requests, it finishes those it has, then it stops."""
    from haif.store.rollouts import RolloutRepository

    with db_session(config) as session:
        RolloutRepository(session).request_drain(worker_id)
    typer.echo(
        f"drain of {worker_id} requested: the Orchestrator drains it within a few seconds "
        "(it finishes its requests first)"
    )
