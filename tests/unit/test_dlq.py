"""The DLQ on the embedded store (SQLite) and on a private Redis that dies: what a final
failure leaves behind, replays under the original Idempotency-Key, and the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from haif.cli.main import app
from haif.config import HaifConfig
from haif.dlq import DeadLetterQueue
from haif.exceptions import InvalidRequest, RateLimited
from haif.gateway.replay import replay_item
from haif.protocol import CompletionRequest
from haif.store import Database, open_database
from haif.store.ledger import usage_total
from haif.store.quotas import QuotaLimits
from tests.support.admission import answer, make_tenant
from tests.support.dlq import MODELS, admission, final_error, job, request
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.unit

@pytest.fixture
def config(tmp_path: Path) -> HaifConfig:
    return sqlite_config(tmp_path, **MODELS)


async def test_a_final_failure_is_dead_lettered_once_with_what_replay_needs(
    config: HaifConfig, sqlite_db: Database
) -> None:
    tenant_id, token = make_tenant(sqlite_db, "acme", QuotaLimits(max_concurrent=2))
    adm = admission(config, sqlite_db)

    async def run() -> str:
        ticket = await adm.admit(request(config, token, idem="order-7"))
        await adm.fail(ticket, final_error(3))
        await adm.fail(ticket, final_error(3))  # settled once, whatever the callers do
        return ticket.job_id

    job_id = await run()
    row = job(sqlite_db, job_id)
    assert (row.state, row.attempts) == ("dead_lettered", 3)
    dlq = DeadLetterQueue(config, sqlite_db)
    [entry] = dlq.newest(10)
    assert entry.id == job_id and entry.tenant == "acme" and entry.tenant_id == tenant_id
    assert (entry.error_type, entry.error_code, entry.attempts) == (
        "WorkerUnavailable",
        "worker_unavailable",
        3,
    )
    assert entry.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert (entry.request_id, entry.idempotency_key, entry.model, entry.kind) == (
        "req-1",
        "order-7",
        "echo",
        "completion",
    )
    assert entry.request() == CompletionRequest(model="echo", prompt="hello", max_tokens=4)
    with sqlite_db.connect() as conn:
        assert usage_total(conn, tenant_id) == (0, 0, 0)  # not billed
        assert conn.exec_driver_sql("SELECT in_flight FROM quotas").scalar() == 0  # slot freed


@pytest.mark.parametrize(
    "exc", [InvalidRequest("bad"), RateLimited("slow down"), asyncio.CancelledError()]
)
async def test_client_errors_and_disconnects_are_not_dead_lettered(
    config: HaifConfig, sqlite_db: Database, exc: BaseException
) -> None:
    _, token = make_tenant(sqlite_db, "acme")
    adm = admission(config, sqlite_db)

    async def run() -> str:
        ticket = await adm.admit(request(config, token))
        await adm.fail(ticket, exc)
        await asyncio.gather(*adm._settling)
        return ticket.job_id

    assert job(sqlite_db, await run()).state == "failed"
    assert DeadLetterQueue(config, sqlite_db).newest(10) == []


@pytest.mark.parametrize("idem", ["order-9", None])
async def test_replay_runs_once_under_the_original_or_a_derived_key(
    config: HaifConfig, sqlite_db: Database, idem: str | None
) -> None:
    tenant_id, token = make_tenant(sqlite_db, "acme")
    adm = admission(config, sqlite_db)
    dlq = DeadLetterQueue(config, sqlite_db)
    executions: list[str] = []

    async def replay() -> str:
        item, principal = await replay_item(config, sqlite_db, dlq.get(dead_id))
        ticket = await adm.admit_trusted(item, principal)
        if ticket.replay is None:
            executions.append(ticket.job_id)
            await adm.succeed(ticket, 3, 2, answer("echo", ticket.job_id))
            await asyncio.gather(*adm._settling)
        return ticket.job_id

    async def first() -> str:
        ticket = await adm.admit(request(config, token, idem=idem))
        await adm.fail(ticket, final_error(2))
        return ticket.job_id

    dead_id = await first()
    replayed = await replay()
    again = await replay()
    assert len(executions) == 1 and replayed == again
    if idem is not None:  # the original job is taken over: the same id ends succeeded
        assert replayed == dead_id
    assert job(sqlite_db, replayed).state == "succeeded"
    with sqlite_db.connect() as conn:
        assert usage_total(conn, tenant_id) == (1, 3, 2)


async def test_a_truncated_body_is_kept_but_not_replayable(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path, dlq={"max_body_bytes": 1024}, **MODELS)
    db = open_database(config, migrate=True)
    _, token = make_tenant(db, "acme")
    adm = admission(config, db)

    async def run() -> None:
        ticket = await adm.admit(request(config, token, prompt="x" * 4000))
        await adm.fail(ticket, final_error(1))

    await run()
    [entry] = DeadLetterQueue(config, db).newest(1)
    assert entry.body_truncated and len(entry.body.encode()) <= 1024
    with pytest.raises(InvalidRequest, match="truncated"):
        entry.request()
    db.close()


# --- the CLI on the embedded store --------------------------------------------------------------


def cli(cfg: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["dlq", *args, "--config", str(cfg)])
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


async def test_cli_list_show_purge_and_exit_codes(tmp_path: Path) -> None:
    cfg = tmp_path / "haif.yaml"
    cfg.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'h.db'}"}, **MODELS}))
    config = sqlite_config(tmp_path, database={"url": f"sqlite:///{tmp_path / 'h.db'}"}, **MODELS)
    db = open_database(config, migrate=True)
    _, acme = make_tenant(db, "acme")
    _, globex = make_tenant(db, "globex")
    adm = admission(config, db)

    async def fail_one(token: str) -> str:
        ticket = await adm.admit(request(config, token))
        await adm.fail(ticket, final_error(2))
        return ticket.job_id

    a1, g1, a2 = [await fail_one(t) for t in (acme, globex, acme)]
    listed = cli(cfg, "list", "--json")
    assert [line.split('"id": "')[1].split('"')[0] for line in listed.splitlines()] == [a2, g1, a1]
    assert '"body"' not in listed
    acme_only = cli(cfg, "list", "--tenant", "acme", "--json")
    assert a1 in acme_only and a2 in acme_only and g1 not in acme_only
    assert "3 dead letter(s)" in cli(cfg, "list")
    shown = cli(cfg, "show", g1)
    assert '"tenant": "globex"' in shown and '"prompt":"hello"' in shown.replace(" ", "").replace("\\", "")
    assert "no dead letter" in cli(cfg, "show", "cmpl-nope", code=1)
    assert "purged " + a1 in cli(cfg, "purge", a1)
    assert "no dead letter" in cli(cfg, "purge", a1, code=1)
    assert "id or --all" in cli(cfg, "purge", code=2)
    assert "id or --all" in cli(cfg, "purge", g1, "--all", code=2)
    assert "no cluster" in cli(cfg, "replay", a2, code=2)
    assert "purged 2 dead letter(s)" in cli(cfg, "purge", "--all")
    assert "0 dead letter(s)" in cli(cfg, "list")
    db.close()
