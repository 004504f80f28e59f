"""LoRA adapters at the Gateway: the names a client may send (BASE:ADAPTER, an adapter's own
name, an adapter served on demand), token model lists that name adapters, the envelope
and the usage record that carry the adapter, /v1/models with `parent`, and routing that
prefers workers with the adapter loaded without pinning a hot one to one worker."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from haif.config import HaifConfig, ResilienceConfig
from haif.envelope import (
    Adapter,
    Dispatched,
    RequestContext,
    ResolvedModel,
    WorkItem,
    build_work_item,
)
from haif.exceptions import ModelNotFound, PermissionDenied
from haif.gateway.catalog import ModelCatalog
from haif.orchestrator.backends import ModelRouter, Route, new_breaker
from haif.orchestrator.table import SHARED_TIER, ModelRoutes, RoutingTable, WorkerRoute
from haif.protocol import ChatCompletionRequest, StreamOptions
from haif.runtimes.base import GenerationOutput, StreamEvent
from haif.store import Database
from haif.store.models import Job, UsageRecord
from tests.support.admission import admission, answer, item, make_tenant
from tests.support.sqlite import sqlite_config

pytestmark = pytest.mark.unit

MODELS = {"models": [
    {"name": "tiny", "runtime": "torch", "artifact": "tiny:1", "dynamic_adapters": True,
     "adapters": [{"name": "sql", "artifact": "sql-lora:1"}, {"name": "chat", "artifact": "chat-lora:2"}]},
    {"name": "fixed", "runtime": "torch", "artifact": "fixed:1", "adapters": [{"name": "poem", "artifact": "poem:1"}]},
    {"name": "echo", "runtime": "echo"},
]}


@pytest.fixture
def config(tmp_path: Path) -> HaifConfig:
    return sqlite_config(tmp_path, **MODELS)


def test_what_each_name_serves(config: HaifConfig) -> None:
    catalog = ModelCatalog(config)

    def served(name: str) -> tuple[str, Adapter | None] | None:
        found = catalog.resolve(name)
        return None if found is None else (found.base, found.adapter)

    assert served("tiny") == ("tiny", None)
    assert served("tiny:sql") == served("sql") == ("tiny", Adapter("sql", "sql-lora:1"))
    assert served("fixed:poem") == served("poem") == ("fixed", Adapter("poem", "poem:1"))
    # On demand (dynamic_adapters): any artifact ref; a configured one keeps its own name.
    assert served("tiny:legal-lora:3") == ("tiny", Adapter("legal-lora:3", "legal-lora:3"))
    digest = "sha256:" + "ab" * 32
    assert served(f"tiny:{digest}") == ("tiny", Adapter(digest, digest))
    assert served("tiny:chat-lora:2") == ("tiny", Adapter("chat", "chat-lora:2"))
    for unknown in ("fixed:legal-lora:3", "tiny:nope", "tiny:", "echo:sql", "sql-lora:1", "nope"):
        assert served(unknown) is None, unknown


def test_adapter_and_model_names_never_clash() -> None:
    with pytest.raises(ValueError, match="used twice: echo"):
        HaifConfig.model_validate({"models": [
            {"name": "echo", "runtime": "echo"},
            {"name": "tiny", "runtime": "torch", "path": "x", "adapters": [{"name": "echo", "artifact": "e:1"}]},
        ]})
    with pytest.raises(ValueError, match="need a generating model on runtime torch or vllm"):
        HaifConfig.model_validate({"models": [{"name": "e", "runtime": "echo", "dynamic_adapters": True}]})
    with pytest.raises(ValueError, match="duplicate adapter names: a"):
        HaifConfig.model_validate({"models": [{"name": "t", "runtime": "torch", "path": "x", "adapters": [
            {"name": "a", "artifact": "a:1"}, {"name": "a", "artifact": "a:2"}]}]})
    with pytest.raises(ValueError, match="artifact"):
        HaifConfig.model_validate({"models": [{"name": "t", "runtime": "torch", "path": "x",
                                               "adapters": [{"name": "a", "artifact": "no version"}]}]})


def test_a_token_may_name_adapters_and_a_base_does_not_grant_them(config: HaifConfig) -> None:
    catalog = ModelCatalog(config)
    assert catalog.permits(None, "tiny:sql")
    assert catalog.permits({"tiny:sql"}, "tiny:sql") and catalog.permits({"tiny:sql"}, "sql")
    assert catalog.permits({"sql"}, "tiny:sql")
    assert not catalog.permits({"tiny:sql"}, "tiny") and not catalog.permits({"tiny:sql"}, "tiny:chat")
    assert not catalog.permits({"tiny"}, "tiny:sql"), "the base alone does not grant its adapters"
    assert catalog.permits({"tiny:*"}, "tiny:chat") and catalog.permits({"tiny:*"}, "tiny:legal-lora:3")
    assert not catalog.permits({"tiny:*"}, "tiny")
    assert catalog.permits({"tiny:legal-lora:3"}, "tiny:legal-lora:3")
    assert catalog.listed({"tiny", "fixed:*"}) == [("tiny", None), ("fixed:poem", "fixed")]
    assert catalog.listed(None) == [
        ("tiny", None), ("tiny:sql", "tiny"), ("tiny:chat", "tiny"), ("fixed", None),
        ("fixed:poem", "fixed"), ("echo", None),
    ]


async def test_admission_hands_the_worker_the_base_and_the_adapter_and_bills_the_adapter(
    config: HaifConfig, sqlite_db: Database
) -> None:
    tenant_id, key = make_tenant(sqlite_db, "acme", allowed_models=["tiny:sql", "tiny:*"])
    _, anyone = make_tenant(sqlite_db, "globex")
    gate = admission(config, sqlite_db)

    async def scenario() -> None:
        ticket = await gate.admit(item(config, key, model="sql"))
        assert (ticket.item.base, ticket.item.adapter) == ("tiny", Adapter("sql", "sql-lora:1"))
        assert (ticket.item.model, ticket.item.resolved.requested) == ("sql", "sql"), "as sent"
        assert ticket.item.served_model == "tiny:sql"
        await gate.succeed(ticket, 3, 2, answer(ticket.item.served_model, ticket.job_id))
        dynamic = await gate.admit(item(config, key, model="tiny:legal-lora:3"))
        assert dynamic.item.adapter == Adapter("legal-lora:3", "legal-lora:3")
        await gate.succeed(dynamic, 3, 2)
        with pytest.raises(PermissionDenied):
            await gate.admit(item(config, key, model="tiny"))
        with pytest.raises(ModelNotFound):
            await gate.admit(item(config, anyone, model="tiny:nope"))
        await asyncio.gather(*gate._settling)  # settlements that run after their response

    await scenario()
    with sqlite_db.session() as s:
        jobs = s.execute(select(Job.model, Job.version).where(Job.tenant_id == tenant_id)).all()
        usage = sorted(s.execute(select(UsageRecord.model).where(UsageRecord.tenant_id == tenant_id)).scalars())
    assert sorted(jobs) == [("tiny:legal-lora:3", "1"), ("tiny:sql", "1")]
    assert usage == ["tiny:legal-lora:3", "tiny:sql"], "usage records carry the adapter"


async def test_v1_models_lists_each_adapter_under_its_parent(config: HaifConfig, sqlite_db: Database) -> None:
    from haif.gateway.pipeline import Pipeline

    _, key = make_tenant(sqlite_db, "acme", allowed_models=["tiny", "tiny:chat", "poem"])
    from haif.gateway.compose import GatewayParts
    from haif.orchestrator.router import Router

    pipeline = Pipeline(config, GatewayParts(admission(config, sqlite_db), Router(config)))
    ctx = RequestContext.new(timeout_s=5, api_key=key)
    listing = await pipeline.models(ctx)
    assert [(c.id, c.parent) for c in listing.data] == [
        ("tiny", None), ("tiny:chat", "tiny"), ("fixed:poem", "fixed"),
    ]


# --- routing -------------------------------------------------------------------------------


def _router(loads: dict[str, int], warm: set[str], margin: int = 4) -> ModelRouter:
    workers = tuple(
        WorkerRoute(w, None, "a", SHARED_TIER, "ready", 64, load=load,
                    adapters=frozenset({"sql"} if w in warm else ()))
        for w, load in loads.items()
    )
    router = ModelRouter(ModelRoutes("tiny", "generate", workers), max_queued=8, overloaded_retry_after_s=1,
                         new_breaker=lambda: new_breaker(ResilienceConfig()),
                         rng=random.Random(3), adapter_spill_margin=margin)
    router.update(router.routes)
    return router


async def _pick(router: ModelRouter, adapter: str | None = "sql", *, keep: bool = False) -> str:
    """The worker a request gets; ``keep``: it stays in flight there (its load counts)."""
    async def go() -> str:
        backend = await router.acquire(Route(SHARED_TIER, ("a",)), RequestContext.new(timeout_s=5, api_key=None),
                                       frozenset(), adapter)
        if not keep:
            router.release(backend)
        return backend.worker_id

    return await go()


async def test_an_adapter_goes_where_it_is_loaded() -> None:
    router = _router({"w1": 2, "w2": 0, "w3": 0}, warm={"w1"})
    assert {await _pick(router) for _ in range(10)} == {"w1"}, "warm within the margin: always there"
    assert await _pick(router, adapter=None) in {"w2", "w3"}, "the base: least loaded as before"
    assert await _pick(_router({"w1": 0, "w2": 0}, warm=set())) in {"w1", "w2"}, "warm nowhere: any one loads it"


async def test_a_hot_adapter_spills_to_a_cold_worker_past_the_margin() -> None:
    router = _router({"w1": 0, "w2": 0}, warm={"w1"}, margin=4)
    picks = [await _pick(router, keep=True) for _ in range(12)]  # in flight: w1's load grows
    assert picks[:5] == ["w1"] * 5, "up to the margin over the cold one, the warm one"
    assert "w2" in picks[5:], "then the cold worker gets some (and loads the adapter)"
    assert abs(picks.count("w1") - picks.count("w2") - 4) <= 1, "and the two stay within the margin"


def test_the_loaded_adapters_are_not_a_new_table_version() -> None:
    def table(adapters: frozenset[str], load: int) -> RoutingTable:
        worker = WorkerRoute("w1", None, "a", SHARED_TIER, "ready", 8, load, adapters=adapters)
        return RoutingTable.of({"tiny": ModelRoutes("tiny", "generate", (worker,))})

    assert table(frozenset(), 0).version == table(frozenset({"sql", "chat"}), 5).version


def test_metrics_count_an_adapter_request_with_its_base() -> None:
    from haif.telemetry.metrics import OTHER, model_label

    known = frozenset({"tiny", "a:b"})
    assert model_label("tiny:sql", known) == "tiny"
    assert model_label("tiny:legal-lora:3", known) == "tiny"
    assert model_label("a:b:lora", known) == "a:b"
    assert model_label("sql", known) == model_label("nope:x", known) == OTHER


# --- one name in every answer ---------------------------------------------------------------


class _Worker:
    """The router as the pipeline sees it: one worker that answers every request alike, and
    records the items it is handed."""

    version = "v1"

    def __init__(self) -> None:
        self.items: list[WorkItem] = []

    async def call(self, item: WorkItem, method: str) -> Dispatched:
        self.items.append(item)
        return Dispatched("w-1", "local", 1, [GenerationOutput("one two", 3, 2, "stop")], "1")

    async def stream(self, item: WorkItem) -> AsyncIterator[Any]:
        self.items.append(item)
        yield Dispatched("w-1", "local", 1, StreamEvent("one", 3, 1), "1")
        yield StreamEvent(" two", 3, 2, "stop")


def _chat(config: HaifConfig, key: str, model: str, *, stream: bool) -> WorkItem:
    body = ChatCompletionRequest(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=stream,
        stream_options=StreamOptions(include_usage=True) if stream else None,
    )
    ctx = RequestContext.new(timeout_s=10, api_key=key)
    return build_work_item("chat", body, ctx, config.limits)


@pytest.mark.parametrize("name", ["sql", "tiny:sql", "tiny:sql-lora:1"])
async def test_a_streamed_and_a_plain_answer_name_an_adapter_alike(
    config: HaifConfig, sqlite_db: Database, name: str
) -> None:
    """However the adapter is named, plain and streamed answers (every chunk) carry the served
    name BASE:ADAPTER, and the worker gets the base and the adapter, resolved once."""
    from haif.gateway.compose import GatewayParts
    from haif.gateway.pipeline import Pipeline

    _, key = make_tenant(sqlite_db, "acme")
    worker = _Worker()
    parts = GatewayParts(admission(config, sqlite_db), worker)  # type: ignore[arg-type]
    pipeline = Pipeline(config, parts)

    plain = await pipeline.generate(_chat(config, key, name, stream=False))
    chunks = [c async for c in pipeline.stream(_chat(config, key, name, stream=True))]
    await asyncio.gather(*pipeline.admission._settling)
    assert plain.model == "tiny:sql"
    names = [c.model for c in chunks]
    assert len(chunks) >= 3 and set(names) == {plain.model}, names
    assert {c.system_fingerprint for c in chunks} == {plain.system_fingerprint} == {"tiny:1"}
    assert [(i.base, i.adapter, i.model) for i in worker.items] == [
        ("tiny", Adapter("sql", "sql-lora:1"), name)
    ] * 2
    resolved = ResolvedModel(name, "tiny", Adapter("sql", "sql-lora:1"), "1")
    assert {i.resolved for i in worker.items} == {resolved}
