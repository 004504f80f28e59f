"""The routing table's long-poll: the Orchestrator's host answers a change at once and a
quiet table after the refresh; a Gateway's client keeps its last table while the
Orchestrator does not answer; every replica looking at the same fleet publishes one version."""

from __future__ import annotations

import asyncio
import time

import pytest

from haif.orchestrator.table import ModelRoutes, RoutingTable, TableClient, TableHost, WorkerRoute

pytestmark = pytest.mark.unit


def table(state: str = "ready", load: int = 0) -> RoutingTable:
    worker = WorkerRoute("m/local/0#abcd", None, "local", "shared", state, 8, load)
    return RoutingTable.of({"m": ModelRoutes(name="m", kind="generate", workers=(worker,))})


def test_the_version_is_the_routing_facts_not_the_load() -> None:
    assert table(load=0).version == table(load=7).version, "a new load figure is not a new table"
    assert table("ready").version != table("dead").version
    # Two Orchestrator replicas that see the same fleet publish the same version.
    assert RoutingTable.of(dict(table().models)).version == table().version


async def test_listen_answers_a_change_at_once_and_a_quiet_table_after_the_refresh() -> None:
    async def scenario() -> None:
        host = TableHost()
        host.publish(table("loading"))
        # A caller without the current version gets it at once.
        assert (await asyncio.wait_for(host.listen(None, 30), 1)).version == table("loading").version
        waiting = asyncio.create_task(host.listen(table("loading").version, 30))
        await asyncio.sleep(0.02)
        host.publish(table("loading", load=3))  # only the load: the listener keeps waiting
        await asyncio.sleep(0.02)
        assert not waiting.done()
        host.publish(table("ready"))
        assert (await asyncio.wait_for(waiting, 1)).version == table("ready").version
        started = time.monotonic()
        quiet = await host.listen(table("ready").version, 0.05)
        assert quiet.version == table("ready").version and time.monotonic() - started >= 0.05

    await scenario()


async def test_the_client_keeps_its_last_table_while_the_orchestrator_is_down() -> None:
    async def scenario() -> None:
        answers: list[object] = [table("ready"), ConnectionError("replica gone"), ConnectionError("still"),
                                 table("dead")]
        asked: list[str | None] = []
        seen: list[str] = []

        async def listen(version: str | None) -> RoutingTable:
            asked.append(version)
            answer = answers.pop(0) if answers else None
            if answer is None:
                await asyncio.sleep(3600)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[return-value]

        client = TableClient(listen, lambda t: seen.append(t.version))
        stop = asyncio.Event()
        runner = asyncio.create_task(client.run(stop))
        first = await client.first(1)
        assert first is not None and first.version == table("ready").version
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert seen == [table("ready").version, table("dead").version]
        # Between, the client asked with the version it held, and kept it.
        assert asked[:4] == [None, table("ready").version, table("ready").version, table("ready").version]
        assert client.failures == 0
        stop.set()
        runner.cancel()

    await scenario()


async def test_first_gives_up_at_its_timeout() -> None:
    async def scenario() -> None:
        async def never(version: str | None) -> RoutingTable:
            await asyncio.sleep(3600)
            raise AssertionError

        client = TableClient(never, lambda t: None)
        runner = asyncio.create_task(client.run(asyncio.Event()))
        assert await client.first(0.05) is None
        runner.cancel()

    await scenario()
