"""tiny-llama on the vLLM runtime, through the whole platform with the official client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import Deployment, wait_for

MODEL = "tiny-llama-vllm"


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


def test_disconnect_aborts_in_the_engine(orchestrator, haif: Deployment) -> None:  # noqa: ANN001
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 256, "temperature": 0, "stream": True}
    with httpx.Client(base_url=haif.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", headers=haif.headers(), json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"text":"' in line:
                    break  # hang up after the first token

    def engine_idle() -> bool:
        (info,) = orchestrator.workers_info.remote(MODEL).result()
        return info["runtime_stats"].get("unfinished") == 0 and info["in_flight"] == 0

    wait_for(engine_idle, timeout_s=10, what="vLLM to abort the abandoned request")
