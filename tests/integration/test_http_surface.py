"""The HTTP contract: health, readiness, errors, limits — never a 500, never a trace."""

from __future__ import annotations

import httpx
import pytest

from tests.support.deployment import Deployment


def _assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert "Traceback" not in resp.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_healthz_and_openapi(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    spec = http.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        assert path in spec["paths"]


def test_readyz_names_the_model_that_is_not_ready(http: httpx.Client) -> None:
    resp = http.get("/readyz")
    # gpu-hungry asks for a GPU that the cluster does not have left: the deployment
    # is not fully ready, says which model and why, and serves the others.
    assert resp.status_code == 503
    models = resp.json()["models"]
    assert models["gpu-hungry"]["state"] == "failed"
    assert "GPU" in models["gpu-hungry"]["error"]
    for name in ("echo", "minilm", "tiny-llama", "tiny-llama-vllm", "gpu-echo", "gpu-fallback"):
        assert models[name]["state"] == "ready", models[name]


def test_request_id_is_echoed(http: httpx.Client, auth: dict) -> None:
    resp = http.get("/v1/models", headers={**auth, "X-Request-ID": "my-req-42"})
    assert resp.headers["x-request-id"] == "my-req-42"
    assert http.get("/v1/models", headers=auth).headers.get("x-request-id")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer " + "x" * 5000}],
)
def test_bad_keys_get_one_uniform_401(http: httpx.Client, headers: dict) -> None:
    resp = http.post("/v1/completions", headers=headers, json={"model": "echo", "prompt": "hi"})
    err = _assert_error(resp, 401, "invalid_api_key")
    assert err["message"] == "invalid or missing API key"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {"prompt": "x"}, 422),  # missing model
        ("/v1/completions", {"model": "echo"}, 422),  # missing prompt
        ("/v1/completions", {"model": "echo", "prompt": 5}, 422),  # wrong type
        ("/v1/completions", {"model": "echo", "prompt": []}, 422),
        ("/v1/completions", {"model": "echo", "prompt": "x", "max_tokens": 0}, 422),
        ("/v1/completions", {"model": "echo", "prompt": "x", "max_tokens": 2049}, 422),  # over the limit
        ("/v1/completions", {"model": "echo", "prompt": "x", "temperature": 9}, 422),
        ("/v1/completions", {"model": "echo", "prompt": "x", "frobnicate": 1}, 422),  # unknown field
        ("/v1/completions", {"model": "echo", "prompt": ["a", "b"], "stream": True}, 400),
        ("/v1/chat/completions", {"model": "echo", "messages": []}, 422),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "robot", "content": "x"}]}, 422),
        ("/v1/chat/completions", {"model": "minilm", "messages": [{"role": "user", "content": "x"}]}, 422),
        ("/v1/embeddings", {"model": "minilm", "input": ["x"] * 65}, 422),  # over max_embedding_inputs
        ("/v1/embeddings", {"model": "minilm", "input": [10**9]}, 400),  # a token id outside the vocabulary
        ("/v1/embeddings", {"model": "echo-slow", "input": "x", "dimensions": 3}, 422),
        ("/v1/embeddings", {"model": "tiny-llama", "input": "x"}, 422),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404),
        ("/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404),
    ],
)
def test_bad_bodies_get_4xx(http: httpx.Client, auth: dict, path: str, body: dict, status: int) -> None:
    _assert_error(http.post(path, headers=auth, json=body), status)


def test_prompt_too_long_is_422_context_length(http: httpx.Client, auth: dict) -> None:
    prompt = "word " * 1100  # the integration limit is 1024 prompt tokens
    resp = http.post("/v1/completions", headers=auth, json={"model": "echo", "prompt": prompt})
    _assert_error(resp, 422, "context_length_exceeded")
    resp = http.post(
        "/v1/completions", headers=auth, json={"model": "tiny-llama", "prompt": prompt, "stream": True}
    )
    _assert_error(resp, 422, "context_length_exceeded")  # a plain error, not a broken stream


def test_malformed_bodies(http: httpx.Client, auth: dict) -> None:
    h = {**auth, "content-type": "application/json"}
    _assert_error(http.post("/v1/completions", headers=h, content=b'{"model": "echo", "prompt":'), 400)
    _assert_error(http.post("/v1/completions", headers=h, content=b'{"model":"echo","prompt":"\xff\xfe"}'), 400)
    _assert_error(http.post("/v1/completions", headers=h, content=b"[1, 2]"), 422)
    lone_surrogate = b'{"model": "echo", "prompt": "\\ud800"}'  # valid JSON, not valid text
    _assert_error(http.post("/v1/completions", headers=h, content=lone_surrogate), 422)


def test_huge_body_is_413(http: httpx.Client, auth: dict) -> None:
    body = b'{"model": "echo", "prompt": "' + b"a" * 2_000_000 + b'"}'
    resp = http.post("/v1/completions", headers={**auth, "content-type": "application/json"}, content=body)
    _assert_error(resp, 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "echo", "prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    resp = http.post("/v1/completions", headers={**auth, "content-type": "application/json"}, content=chunks())
    _assert_error(resp, 413, "request_too_large")


def test_unknown_routes_and_methods(http: httpx.Client, auth: dict) -> None:
    _assert_error(http.get("/v1/nothing", headers=auth), 404)
    _assert_error(http.delete("/v1/models", headers=auth), 405)


def test_get_one_model(http: httpx.Client, auth: dict) -> None:
    assert http.get("/v1/models/echo", headers=auth).json()["id"] == "echo"
    _assert_error(http.get("/v1/models/nope", headers=auth), 404, "model_not_found")


def test_gpu_model_without_gpu_answers_503_with_reason(http: httpx.Client, auth: dict) -> None:
    resp = http.post("/v1/completions", headers=auth, json={"model": "gpu-hungry", "prompt": "x"})
    err = _assert_error(resp, 503, "gpu_unavailable")
    assert "allow_cpu_fallback" in err["message"]


def test_sse_format(http: httpx.Client, auth: dict) -> None:
    body = {"model": "echo", "prompt": "a b c", "stream": True}
    with http.stream("POST", "/v1/completions", headers=auth, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_deployment_fixture(haif: Deployment) -> None:
    assert haif.url.startswith("http://127.0.0.1:")
