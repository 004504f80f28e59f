"""Dead-letter queue tests on the embedded store: a final worker error, a work item, a job row."""

from __future__ import annotations

from sqlalchemy import select

from haif.config import HaifConfig
from haif.envelope import RequestContext, build_work_item
from haif.exceptions import WorkerUnavailable
from haif.gateway.admission import Admission
from haif.gateway.auth import DatabaseAuthenticator
from haif.gateway.quota import QuotaGate
from haif.protocol import CompletionRequest
from haif.store import Database
from haif.store.models import Job

MODELS = {"models": [{"name": "echo", "runtime": "echo"}]}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def final_error(attempts: int) -> WorkerUnavailable:
    exc = WorkerUnavailable("no worker of 'echo' answered")
    exc.attempts = attempts  # as the Orchestrator's final error carries it
    return exc


def request(config: HaifConfig, key: str | None, idem: str | None = None, prompt: str = "hello"):
    body = CompletionRequest(model="echo", prompt=prompt, max_tokens=4)
    ctx = RequestContext.new(
        timeout_s=10, api_key=key, idempotency_key=idem, traceparent=TRACEPARENT, request_id="req-1"
    )
    return build_work_item("completion", body, ctx, config.limits)


def job(db: Database, job_id: str) -> Job:
    with db.session() as s:
        return s.execute(select(Job).where(Job.id == job_id)).scalar_one()


def admission(config: HaifConfig, db: Database) -> Admission:
    auth = DatabaseAuthenticator(db, ttl_s=5, max_entries=100)
    return Admission(config, auth, db=db, quotas=QuotaGate(db, None))
