"""LoRA adapters through the whole platform: signed adapter artifacts of tiny-llama:1
(tests/support/lora_cases.py, published by tests/support/artifacts.py), served by the
torch runtime (tiny-llama-lora: two workers; tiny-llama-lora-solo: one, room for two of
its three adapters) and by vLLM (tiny-llama-vllm), over HTTP with the official client.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import openai
import pytest
from sqlalchemy import create_engine, select

from haif.store.models import Job
from tests.support.deployment import Deployment, haif_cli
from tests.support.metrics import scrape, total
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MODEL, SOLO, VLLM = "tiny-llama-lora", "tiny-llama-lora-solo", "tiny-llama-vllm"
PROMPTS = ["The teacher", "Hello", "Why is the river so quiet?"]
TABLE_S = 4.0  # a probe (1 s) and the Gateways' table refresh (1 s), twice over


@pytest.fixture(scope="module")
def client(haif: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{haif.url}/v1", api_key=haif.api_key, max_retries=0)


@pytest.fixture(scope="module", autouse=True)
def ready(http: httpx.Client) -> None:
    def up() -> bool:
        models = http.get("/readyz").json()["models"]
        return all(models[m]["state"] == "ready" for m in (MODEL, SOLO, VLLM))

    wait_for(up, 600, 1.0, "the LoRA models to be ready")


@pytest.fixture(scope="module")
def db(pg_url: str, haif: Deployment):  # noqa: ANN201
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def greedy(client: openai.OpenAI, model: str, prompt: str = "The teacher", max_tokens: int = 16) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text


def workers(orchestrator, model: str) -> list[dict]:  # noqa: ANN001
    return orchestrator.workers_info.remote(model).result()


def test_v1_models_lists_each_adapter_under_its_base(http: httpx.Client, auth: dict) -> None:
    cards = {c["id"]: c for c in http.get("/v1/models", headers=auth).json()["data"]}
    for name in ("lora-a", "lora-b", "lora-c"):
        assert cards[f"{MODEL}:{name}"]["parent"] == MODEL
    assert cards[f"{VLLM}:vlora-a"]["parent"] == VLLM
    assert cards[MODEL].get("parent") is None
    assert http.get(f"/v1/models/{MODEL}:lora-b", headers=auth).json()["parent"] == MODEL


def test_an_adapter_changes_greedy_output_the_same_way_every_call(client: openai.OpenAI) -> None:
    # The answer names what served it: BASE:ADAPTER, however the adapter was named.
    for name in (f"{MODEL}:lora-a", "lora-a", f"{MODEL}:lora-a:1"):
        out = client.completions.create(model=name, prompt="Hello", max_tokens=2, temperature=0)
        assert out.model == f"{MODEL}:lora-a", (name, out.model)
    for prompt in PROMPTS:
        base = greedy(client, MODEL, prompt)
        through = greedy(client, f"{MODEL}:lora-a", prompt)
        assert through != base, prompt
        assert greedy(client, f"{MODEL}:lora-a", prompt) == through
        assert greedy(client, "lora-a", prompt) == through, "its own served name: the same adapter"
        # The same signed adapter, requested on demand by its artifact.
        assert greedy(client, f"{MODEL}:lora-a:1", prompt) == through


def test_plain_and_streamed_answers_name_the_adapter_alike(client: openai.OpenAI) -> None:
    # However the adapter is named, the plain answer and every streamed chunk carry
    # BASE:ADAPTER, and the same system_fingerprint (its base's version).
    messages = [{"role": "user", "content": "Hello"}]
    for name in ("lora-a", f"{MODEL}:lora-a", f"{MODEL}:lora-a:1"):
        plain = client.chat.completions.create(model=name, messages=messages, max_tokens=4, temperature=0)
        chunks = list(client.chat.completions.create(
            model=name, messages=messages, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ))
        assert plain.model == f"{MODEL}:lora-a", (name, plain.model)
        assert len(chunks) >= 2 and {c.model for c in chunks} == {plain.model}, (name, [c.model for c in chunks])
        assert {c.system_fingerprint for c in chunks} == {plain.system_fingerprint}, name


def test_on_vllm_too_and_vllm_agrees_with_the_torch_runtime(client: openai.OpenAI) -> None:
    for prompt in PROMPTS:
        base = greedy(client, VLLM, prompt)
        through = greedy(client, f"{VLLM}:vlora-a", prompt)
        assert through != base and greedy(client, f"{VLLM}:vlora-a", prompt) == through
        # One adapter artifact, two runtimes: the same greedy tokens (PEFT's arithmetic).
        assert through == greedy(client, f"{MODEL}:lora-a", prompt)
        assert base == greedy(client, MODEL, prompt)


@pytest.mark.parametrize("model", [MODEL, VLLM])
def test_a_batch_mixing_the_base_and_two_adapters_gives_each_its_own_answer(
    haif: Deployment, client: openai.OpenAI, model: str
) -> None:
    a, b = ("lora-a", "lora-b") if model == MODEL else ("vlora-a", "vlora-b")
    names = [model, f"{model}:{a}", f"{model}:{b}"]
    alone = {(n, p): greedy(client, n, p) for n in names for p in PROMPTS}

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=haif.url, headers=haif.headers(), timeout=120) as http:
            async def one(name: str, prompt: str) -> str:
                body = {"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0}
                resp = await http.post("/v1/completions", json=body)
                assert resp.status_code == 200, resp.text
                return resp.json()["choices"][0]["text"]

            return await asyncio.gather(*(one(n, p) for n, p in alone for _ in range(2)))

    got = asyncio.run(together())
    assert got == [alone[k] for k in alone for _ in range(2)]


@pytest.mark.parametrize(
    ("adapter", "status", "code", "reason"),
    [
        ("lora-rogue:1", 422, "adapter_rejected", "[untrusted_signer]"),
        ("lora-other:1", 422, "adapter_rejected", "[base_mismatch]"),
        ("tiny-llama:1", 422, "adapter_rejected", "[not_an_adapter]"),
        ("lora-nope:1", 404, "adapter_not_found", "lora-nope:1"),
    ],
)
def test_an_adapter_that_does_not_check_out_is_refused_and_the_base_keeps_serving(
    http: httpx.Client, auth: dict, orchestrator, adapter: str, status: int, code: str, reason: str  # noqa: ANN001
) -> None:
    body = {"model": f"{MODEL}:{adapter}", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    resp = http.post("/v1/completions", headers=auth, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and reason in error["message"], error
    assert all(adapter not in w["adapters"] for w in workers(orchestrator, MODEL)), "nothing loaded"
    ok = http.post("/v1/completions", headers=auth, json={**body, "model": MODEL})
    assert ok.status_code == 200, ok.text
    # A model that does not take adapters on demand: unknown, before any worker is asked.
    assert http.post("/v1/completions", headers=auth, json={**body, "model": f"{SOLO}:{adapter}"}).status_code == 404


def test_two_adapters_per_worker_evict_the_least_recently_used(
    client: openai.OpenAI, orchestrator  # noqa: ANN001
) -> None:
    (info,) = workers(orchestrator, SOLO)
    for name in info["adapters"]:  # start from a known state: whatever is loaded is evicted below
        assert name in ("solo-a", "solo-b", "solo-c")
    through = {n: greedy(client, f"{SOLO}:{n}") for n in ("solo-a", "solo-b")}
    assert workers(orchestrator, SOLO)[0]["adapters"] == ["solo-a", "solo-b"]
    assert greedy(client, f"{SOLO}:solo-a") == through["solo-a"]  # solo-b is now the older
    greedy(client, f"{SOLO}:solo-c")
    assert workers(orchestrator, SOLO)[0]["adapters"] == ["solo-a", "solo-c"]
    assert greedy(client, f"{SOLO}:solo-b") == through["solo-b"], "loaded again, the same answer"
    assert workers(orchestrator, SOLO)[0]["adapters"] == ["solo-c", "solo-b"]


def _worker_of(db, job_ids: list[str]) -> list[str]:  # noqa: ANN001
    def written() -> list[str] | None:
        with db.connect() as conn:
            rows = dict(conn.execute(select(Job.id, Job.worker).where(Job.id.in_(job_ids))).all())
        return [rows[j] for j in job_ids] if len(rows) == len(job_ids) and all(rows.values()) else None

    return wait_for(written, 30, 0.2, "the jobs' worker records")


def test_an_adapter_goes_to_the_worker_that_has_it_loaded(
    client: openai.OpenAI, orchestrator, db  # noqa: ANN001
) -> None:
    first = client.completions.create(model=f"{MODEL}:lora-c", prompt="Hello", max_tokens=4, temperature=0)
    (warm,) = _worker_of(db, [first.id])
    time.sleep(TABLE_S)  # its probe reports lora-c, the Gateways' tables carry it
    assert [w["worker_id"] for w in workers(orchestrator, MODEL) if "lora-c" in w["adapters"]] == [warm]
    ids = [client.completions.create(model=f"{MODEL}:lora-c", prompt=p, max_tokens=4, temperature=0).id
           for p in PROMPTS * 3]
    assert set(_worker_of(db, ids)) == {warm}, "one at a time, well within the margin: the warm worker"


def test_a_hot_adapter_spreads_to_the_other_worker(haif: Deployment, orchestrator) -> None:  # noqa: ANN001
    """32 at once for one adapter: past adapter_spill_margin (4) over the other worker's load,
    requests go to it, and it loads the adapter too."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=haif.url, headers=haif.headers(), timeout=120) as http:
            body = {"model": f"{MODEL}:lora-b", "prompt": "The lighthouse", "max_tokens": 24, "temperature": 0}
            return [r.status_code for r in await asyncio.gather(*(http.post("/v1/completions", json=body)
                                                                     for _ in range(32)))]

    before = {w["worker_id"]: w["served"] for w in workers(orchestrator, MODEL)}
    assert asyncio.run(burst()) == [200] * 32
    after = workers(orchestrator, MODEL)
    assert all(w["served"] > before[w["worker_id"]] for w in after), "both workers served some"
    assert all("lora-b" in w["adapters"] for w in after)


def test_a_token_may_be_limited_to_an_adapter_and_usage_names_it(
    haif: Deployment, store_env: dict
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    haif_cli(store_env, "tenants", "create", tenant)
    out = haif_cli(store_env, "tokens", "create", "--tenant", tenant, "--models", f"{MODEL}:lora-a")
    token = out.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {token}"}
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=haif.url, headers=headers, timeout=60) as http:
        assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [f"{MODEL}:lora-a"]
        ok = http.post("/v1/completions", json={**body, "model": f"{MODEL}:lora-a"})
        assert ok.status_code == 200 and ok.json()["model"] == f"{MODEL}:lora-a", ok.text
        assert http.post("/v1/completions", json={**body, "model": "lora-a"}).status_code == 200
        for other in (MODEL, f"{MODEL}:lora-b"):
            assert http.post("/v1/completions", json={**body, "model": other}).status_code == 403

    def exported() -> list[str] | None:
        lines = haif_cli(store_env, "usage", "export", "--tenant", tenant).splitlines()
        return lines if len(lines) == 2 else None

    rows = [json.loads(line) for line in wait_for(exported, 30, 0.5, "two usage records")]
    assert {r["model"] for r in rows} == {f"{MODEL}:lora-a"}, "usage records carry the adapter"
    assert {r["version"] for r in rows} == {"1"}


def test_adapter_loads_and_hits_are_counted(client: openai.OpenAI, http: httpx.Client) -> None:
    greedy(client, f"{MODEL}:lora-a")

    def counted() -> dict | None:
        now = scrape(http)
        loads = total(now, "haif_adapter_loads_total", model=MODEL)
        hits = total(now, "haif_adapter_cache_hits_total", model=MODEL)
        evictions = total(now, "haif_adapter_evictions_total", model=SOLO)
        return now if loads >= 1 and hits >= 1 and evictions >= 1 else None

    wait_for(counted, 30, 0.5, "adapter loads, hits and evictions in /metrics")
