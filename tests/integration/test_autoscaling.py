"""Elastic worker fleets on a running deployment (tests/configs/integration.yaml):

- ``elastic-echo``: 1 to 3 workers, 2 ongoing requests per worker as the target, 4
  requests at most on one worker; load above the target grows it to 3, and once the
  load stops it shrinks back to 1, draining, with no failed request;
- ``zero-echo``: ``min_workers: 0``; it starts with no worker, the first request waits
  for one and is served, and after ``downscale_delay_s`` idle the worker stops again.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.support.deployment import Deployment
from tests.support.waiting import wait_for


def model_status(orchestrator, model: str) -> dict:  # noqa: ANN001
    return orchestrator.status.remote().result()["models"][model]


def ready_workers(orchestrator, model: str) -> int:  # noqa: ANN001
    return model_status(orchestrator, model)["workers_by_state"].get("ready", 0)


def workers(orchestrator, model: str) -> int:  # noqa: ANN001
    return model_status(orchestrator, model)["workers"]


async def stream(http: httpx.AsyncClient, model: str, tokens: int) -> tuple[int, bool]:
    body = {"model": model, "prompt": "tok " * tokens, "max_tokens": tokens, "stream": True}
    done = False
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            done = done or line == "data: [DONE]"
        return resp.status_code, done


def test_load_grows_the_fleet_to_max_workers_and_it_shrinks_back_without_failures(
    haif: Deployment, orchestrator  # noqa: ANN001
) -> None:
    model = "elastic-echo"
    wait_for(lambda: ready_workers(orchestrator, model) == 1 and workers(orchestrator, model) == 1,
             60, 0.5, f"{model} at its floor of 1 worker")
    results: list[tuple[int, bool]] = []
    peak: list[int] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=haif.url, headers=haif.headers(), timeout=120) as http:
            stop = asyncio.Event()

            async def client(light: bool) -> None:
                while not stop.is_set():
                    results.append(await stream(http, model, 40))  # 40 tokens at 20 ms: 0.8 s
                    if light:
                        await asyncio.sleep(0.2)

            heavy = [asyncio.create_task(client(False)) for _ in range(12)]  # 12 ongoing: wants 6, max 3
            light = [asyncio.create_task(client(True))]  # goes on while the fleet shrinks
            started = time.monotonic()
            grown = await asyncio.to_thread(
                wait_for, lambda: ready_workers(orchestrator, model) == 3, 60, 0.25, f"{model} grown to 3"
            )
            assert grown
            peak.append(await asyncio.to_thread(workers, orchestrator, model))
            grow_s = time.monotonic() - started
            # The load stops (all but one light client): back to 1 after downscale_delay_s.
            stop.set()
            await asyncio.gather(*heavy)
            stop.clear()
            light.append(asyncio.create_task(client(True)))
            await asyncio.to_thread(
                wait_for, lambda: workers(orchestrator, model) == 1, 60, 0.25, f"{model} back to 1 worker"
            )
            stop.set()
            await asyncio.gather(*light)
            assert grow_s < 30, f"grew in {grow_s:.1f} s"

    asyncio.run(run())
    assert peak == [3], "never more than max_workers"
    failed = [r for r in results if r != (200, True)]
    assert not failed, f"{len(failed)}/{len(results)} failed: {failed[:10]}"
    # The leader decides (a stand-by replica has no decision to show).
    leader = wait_for(lambda: (s := orchestrator.status.remote().result())["leader"] and s, 30, 0.1, "the leader")
    decision = leader["models"][model]["autoscaler"]
    assert decision and decision.startswith("down") and "→1" in decision, decision
    metrics = httpx.get(f"{haif.url}/metrics", timeout=30).text
    decisions = [line for line in metrics.splitlines() if line.startswith("haif_autoscale_decisions_total")]
    assert any(f'model="{model}"' in line and 'direction="up"' in line for line in decisions), decisions
    assert any(f'model="{model}"' in line and 'direction="down"' in line for line in decisions), decisions


def test_a_model_scaled_to_zero_serves_its_first_request_and_scales_to_zero_again(
    haif: Deployment, orchestrator  # noqa: ANN001
) -> None:
    model = "zero-echo"
    ready = httpx.get(f"{haif.url}/readyz", timeout=10).json()["models"][model]
    assert ready["state"] == "ready", ready  # scaled to zero counts as ready
    wait_for(lambda: workers(orchestrator, model) == 0, 60, 0.5, f"{model} at zero workers")
    body = {"model": model, "prompt": "wake up", "max_tokens": 2}
    with httpx.Client(base_url=haif.url, headers=haif.headers(), timeout=120) as http:
        started = time.monotonic()
        first = http.post("/v1/completions", json=body)
        cold_s = time.monotonic() - started
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["text"] == "wake up"
        assert workers(orchestrator, model) == 1
        # Idle for downscale_delay_s (3 s): its worker drains and stops.
        wait_for(lambda: workers(orchestrator, model) == 0, 60, 0.5, f"{model} back to zero")
        again = http.post("/v1/completions", json=body)
        assert again.status_code == 200, again.text
    assert cold_s < 60, cold_s
