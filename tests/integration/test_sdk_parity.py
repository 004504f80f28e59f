"""One request, three ways in (HTTP, SDK handle client, a Ray job), one answer."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import ray

from haif.envelope import RequestContext, build_work_item
from haif.exceptions import AuthenticationFailed, ModelNotFound
from haif.protocol import CompletionRequest, EmbeddingRequest
from haif.sdk import HandleClient, HttpClient
from tests.support.deployment import Deployment, submit_job

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def handle_client(haif: Deployment) -> HandleClient:
    return HandleClient(haif.api_key, app_name=haif.app_name)


def test_http_handle_and_job_agree(haif: Deployment, http: httpx.Client, auth: dict, handle_client: HandleClient) -> None:
    body = {"model": "echo", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    via_http = http.post("/v1/completions", headers=auth, json=body).json()
    via_handle = handle_client.completions(body)
    out = submit_job(
        haif.dashboard_url, "python", "examples/job_query.py", "--api-key", haif.api_key,
        "--model", "echo", "--prompt", PROMPT, "--max-tokens", "5", timeout_s=300,
    )
    via_job = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert via_http["choices"][0]["text"] == via_handle.choices[0].text == via_job["text"] == "the quick brown fox jumps "
    assert via_http["usage"] == via_handle.usage.model_dump() == via_job["usage"]


def test_http_client_returns_the_same_models(haif: Deployment, handle_client: HandleClient) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    with HttpClient(haif.url, haif.api_key) as client:
        over_http = client.chat(body)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat_stream(body) if c.choices)
        assert [m.id for m in client.models().data] == [m.id for m in handle_client.models().data]
        with pytest.raises(ModelNotFound):
            client.completions({"model": "nope", "prompt": "x"})
    over_handle = handle_client.chat(body)
    assert type(over_http) is type(over_handle)
    assert over_http.choices[0].message == over_handle.choices[0].message
    handle_streamed = "".join(c.choices[0].delta.content or "" for c in handle_client.chat_stream(body) if c.choices)
    assert streamed == handle_streamed == over_handle.choices[0].message.content


def test_handle_client_embeddings_and_auth(haif: Deployment, handle_client: HandleClient) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread."]
    reply = handle_client.embeddings({"model": "minilm", "input": texts})
    with HttpClient(haif.url, haif.api_key) as client:
        over_http = client.embeddings({"model": "minilm", "input": texts})
    assert np.allclose(
        [d.embedding for d in reply.data], [d.embedding for d in over_http.data], atol=1e-6
    )
    with pytest.raises(AuthenticationFailed):
        HandleClient("not-the-key", app_name=haif.app_name).completions({"model": "echo", "prompt": "x"})


def test_large_prompt_crosses_hops_by_reference(haif: Deployment) -> None:
    """A 21 KB prompt is put in the object store once; the envelope stays small."""
    from ray import cloudpickle, serve

    gateway = serve.get_deployment_handle("Gateway", app_name=haif.app_name)
    limits = gateway.limits.remote().result()
    prompt = "abcdefghijklmnopqrstuvwxyz " * 800  # 21.6 KB, 800 echo tokens
    body = CompletionRequest(model="echo", prompt=prompt, max_tokens=3)
    ctx = RequestContext.new(timeout_s=30, api_key=haif.api_key)
    item = build_work_item("completion", body, ctx, limits, put=ray.put)
    assert item.by_reference
    assert len(cloudpickle.dumps(item)) < 2048 < len(prompt)
    reply = gateway.generate.remote(item).result()
    assert reply.choices[0].text == "abcdefghijklmnopqrstuvwxyz " * 3
    assert reply.usage.prompt_tokens == 800


def test_large_embedding_result_comes_back_by_reference(haif: Deployment) -> None:
    from ray import serve

    gateway = serve.get_deployment_handle("Gateway", app_name=haif.app_name)
    limits = gateway.limits.remote().result()
    body = EmbeddingRequest(model="minilm", input=[f"sentence number {i}" for i in range(32)])
    ctx = RequestContext.new(timeout_s=60, api_key=haif.api_key)
    result = gateway.embed.remote(build_work_item("embedding", body, ctx, limits, put=ray.put)).result()
    # 32 x 384 float32 = 48 KB, over the 4 KB threshold of the test config.
    assert isinstance(result.vectors, ray.ObjectRef)
    vectors = ray.get(result.vectors)
    assert vectors.shape == (32, 384)
