"""The DLQ of a running deployment: a request that fails finally lands there with its
attempts and trace id; `haif dlq replay` runs it again once (a stream carries no
Idempotency-Key: the replay gets one made from the job id, and runs as a plain request)."""

from __future__ import annotations

import json
import uuid

import pytest
import ray
from sqlalchemy import create_engine, select

from haif.envelope import Refused, RequestContext, build_work_item
from haif.exceptions import DeadlineExceeded
from haif.protocol import CompletionRequest
from haif.store.models import Job, UsageRecord
from tests.support.deployment import Deployment, haif_cli
from tests.support.tenancy import new_tenant, new_token, served
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

TRACE_ID = uuid.uuid4().hex
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def idle(orchestrator) -> bool:  # noqa: ANN001
    return all(w["in_flight"] == 0 for w in orchestrator.workers_info.remote("echo-slow").result())


@pytest.fixture(scope="module")
def db(pg_url: str, haif: Deployment):  # noqa: ANN201 - the deployment migrated it
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def test_a_final_failure_is_dead_lettered_and_replayed_once(
    haif: Deployment, store_env: dict, orchestrator, db  # noqa: ANN001
) -> None:
    from ray import serve

    tenant = new_tenant(store_env)
    token = new_token(store_env, tenant)
    gateway = serve.get_deployment_handle("Gateway", app_name=haif.app_name)
    limits = gateway.limits.remote().result(timeout_s=30)
    # echo-slow streams its prompt back at 50 ms a token: 60 tokens cannot fit a 1 s deadline.
    prompt = " ".join(f"w{i}" for i in range(60))
    body = CompletionRequest(model="echo-slow", prompt=prompt, max_tokens=64, stream=True)
    ctx = RequestContext.new(timeout_s=1.0, api_key=token, traceparent=TRACEPARENT)
    item = build_work_item("completion", body, ctx, limits)
    # The Gateway answers a HAIF error as a value (Refused), the stream's last item.
    *_, last = list(gateway.options(stream=True).stream.remote(item))
    assert isinstance(last, Refused) and isinstance(last.error, DeadlineExceeded), last

    [line] = haif_cli(store_env, "dlq", "list", "--tenant", tenant, "--json").splitlines()
    entry = json.loads(line)
    job_id = entry["id"]
    assert entry["trace_id"] == TRACE_ID and entry["idempotency_key"] is None
    assert (entry["error_type"], entry["error_code"]) == ("DeadlineExceeded", "timeout")
    assert entry["attempts"] >= 1 and entry["model"] == "echo-slow"
    with db.connect() as conn:
        row = conn.execute(select(Job.state, Job.attempts).where(Job.id == job_id)).one()
    assert row.state == "dead_lettered" and row.attempts == entry["attempts"]
    shown = json.loads(haif_cli(store_env, "dlq", "show", job_id))
    assert json.loads(shown["body"]) == body.model_dump(mode="json", exclude_unset=True)

    address = ray.get_runtime_context().gcs_address
    # The timed-out generation may still be running on the worker: count from its end.
    wait_for(lambda: idle(orchestrator), 30, what="echo-slow idle")
    before = served(orchestrator, "echo-slow")
    first = haif_cli(store_env, "dlq", "replay", job_id, "--address", address, "--keep")
    second = haif_cli(store_env, "dlq", "replay", job_id, "--address", address)
    replayed = first.split(" job ", 1)[1].split(" ", 1)[0]
    assert f"replayed {job_id}: job {replayed} succeeded (executed)" in first
    assert f"job {replayed} succeeded (already replayed" in second
    assert served(orchestrator, "echo-slow") - before == 1  # two replays, one execution
    with db.connect() as conn:
        assert conn.execute(select(Job.state).where(Job.id == replayed)).scalar() == "succeeded"
        billed = conn.execute(select(UsageRecord.job_id).where(UsageRecord.job_id == replayed))
        assert len(billed.all()) == 1
    assert haif_cli(store_env, "dlq", "list", "--tenant", tenant, "--json").strip() == ""
