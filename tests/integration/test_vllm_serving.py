"""tiny-llama on the vLLM runtime, through the whole platform with the official client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from haif.store.models import OPEN_STATES, Job
from tests.support.deployment import Deployment
from tests.support.waiting import wait_for

MODEL = "tiny-llama-vllm"
# Ample on a loaded 2-core machine; the check does not lean on time: the runtime counts an
# abort only for a request the engine had not finished.
ABORT_WAIT_S = 60


@pytest.fixture(scope="module")
def client(haif: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{haif.url}/v1", api_key=haif.api_key, max_retries=0)


def test_chat_plain_and_streamed_agree(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about the lighthouse."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert 1 <= plain.usage.completion_tokens <= 12


def test_completion_stop_and_length(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="The farmer", max_tokens=16, temperature=0)
    text = full.choices[0].text
    start = next(i for i in range(len(text) // 2, len(text)) if not text[i].isspace())
    stop = text[start : start + 2]
    cut = client.completions.create(model=MODEL, prompt="The farmer", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert text.startswith(cut.choices[0].text) and stop not in cut.choices[0].text


# As many tokens as the model's context (max_model_len 2048) leaves after the prompt: far
# more than the CPU engine makes in the seconds the test waits, so an engine that kept the
# request would still hold it (and never count it aborted) when the deadline passes.
LONG_MAX_TOKENS = 2000


def test_disconnect_aborts_in_the_engine(orchestrator, haif: Deployment, pg_url: str) -> None:  # noqa: ANN001
    def engine() -> dict:
        (info,) = orchestrator.workers_info.remote(MODEL).result()
        return {**info["runtime_stats"], "in_flight": info["in_flight"]}

    aborted_before = engine()["aborted"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG_MAX_TOKENS, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=haif.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers=haif.headers(), json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"text":"' in line:
                    job_id = json.loads(line[6:])["id"]
                    break  # hang up after the first token

    # The runtime aborted the request in the engine (it counts an abort only for a request
    # the engine had not finished) and the engine holds nothing any more.
    state = wait_for(
        lambda: (s := engine())["aborted"] == aborted_before + 1 and s["unfinished"] == 0 and s["in_flight"] == 0
        and s,
        timeout_s=ABORT_WAIT_S, interval_s=0.1, what="vLLM to abort the abandoned request",
    )
    assert state["unfinished"] == 0

    # The job is settled as a failure (the client left), billed only for what was produced.
    db = create_engine(pg_url)
    try:
        def job() -> Job | None:
            with Session(db) as s:
                row = s.get(Job, job_id)
                return row if row is not None and row.state not in OPEN_STATES else None

        row = wait_for(job, timeout_s=60, what=f"job {job_id} to be settled")
    finally:
        db.dispose()
    assert row.state == "failed", (row.state, row.error)
    assert row.completion_tokens is not None and 1 <= row.completion_tokens < LONG_MAX_TOKENS, row.completion_tokens
