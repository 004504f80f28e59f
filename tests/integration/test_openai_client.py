"""The official `openai` client against a running HAIF: models, completions, chat, embeddings."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from tests.support.deployment import Deployment


@pytest.fixture(scope="module")
def client(haif: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{haif.url}/v1", api_key=haif.api_key, max_retries=0)


def test_lists_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"echo", "minilm", "tiny-llama"} <= ids


def test_completion_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="echo", prompt="one two three four", max_tokens=3)
    assert reply.choices[0].text == "one two three "
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == 4
    assert reply.usage.completion_tokens == 3


def test_chat_tiny_llama(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Tell me about the river."}],
        max_tokens=12,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 5


def test_chat_stream_matches_plain_for_greedy(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What does the farmer grow?"}]
    plain = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == plain.choices[0].message.content
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_embeddings_are_minilm(client: openai.OpenAI) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    reply = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    vecs = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    near, far = float(vecs[0] @ vecs[1]), float(vecs[0] @ vecs[2])
    assert near > far + 0.2, (near, far)
    assert reply.usage.prompt_tokens > 0


def test_embeddings_float_format_equals_base64(client: openai.OpenAI) -> None:
    b64 = client.embeddings.create(model="minilm", input="hello world").data[0].embedding
    flt = client.embeddings.create(model="minilm", input="hello world", encoding_format="float").data[0].embedding
    assert np.allclose(b64, flt, atol=1e-6)


def test_errors_are_typed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="echo", prompt="x", max_tokens=10_000)
