"""The Bridge's edge: EdgeMiddleware (request ids, body limit) and the error handlers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from haif.bridge.errors import install_error_handlers
from haif.bridge.middleware import EdgeMiddleware
from haif.exceptions import ModelNotFound, RateLimited
from haif.protocol import CompletionRequest, ErrorResponse

pytestmark = pytest.mark.unit

LIMIT = 1024
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


async def echo_body(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse(
        {
            "received": len(body),
            "request_id": request.scope["state"]["request_id"],
            "header": request.headers.get("x-request-id"),
        }
    )


def starlette_app() -> Starlette:
    app = Starlette(routes=[Route("/echo", echo_body, methods=["POST"])])
    app.add_middleware(EdgeMiddleware, max_body_bytes=LIMIT)
    return app


class Item(BaseModel):
    name: str
    count: int


def fastapi_app() -> FastAPI:
    """Wired like haif.bridge.app.build_app: handlers, then the edge middleware."""
    app = FastAPI()

    @app.post("/items")
    async def create(item: Item, request: Request) -> dict[str, Any]:
        return {"name": item.name, "request_id": request.state.request_id}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        return {"prompts": body.prompts()}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    @app.get("/missing-model")
    async def missing_model() -> None:
        raise ModelNotFound("model 'x' does not exist")

    @app.get("/rate-limited")
    async def rate_limited() -> None:
        raise RateLimited("slow down", retry_after_s=3)

    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, max_body_bytes=LIMIT)
    return app


@pytest.fixture(scope="module")
def plain() -> Iterator[TestClient]:
    with TestClient(starlette_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    with TestClient(fastapi_app(), raise_server_exceptions=False) as client:
        yield client


def chunks(total: int, size: int = 256) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"x" * n


def assert_413(resp: Any) -> None:
    assert resp.status_code == 413
    body = resp.json()
    ErrorResponse.model_validate(body)
    assert body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error"
    assert str(LIMIT) in body["error"]["message"]


# --- body limit -----------------------------------------------------------------------


def test_declared_length_over_limit_is_413(plain: TestClient) -> None:
    assert_413(plain.post("/echo", content=b"x" * (LIMIT + 1)))


def test_declared_length_over_limit_is_413_before_fastapi_parses(api: TestClient) -> None:
    body = json.dumps({"name": "x" * LIMIT, "count": 1})
    resp = api.post("/items", content=body, headers={"content-type": "application/json"})
    assert_413(resp)
    assert HEX_ID.match(resp.headers["x-request-id"])


def test_chunked_body_over_limit_is_413(plain: TestClient) -> None:
    # A bare Starlette app renders the HTTPException itself; the status is what counts.
    resp = plain.post("/echo", content=chunks(LIMIT * 3))
    assert resp.status_code == 413


def test_chunked_body_over_limit_is_413_on_a_pydantic_route(api: TestClient) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"name": "'
        yield from chunks(LIMIT * 2)
        yield b'", "count": 1}'

    resp = api.post("/items", content=body(), headers={"content-type": "application/json"})
    assert_413(resp)


def test_under_limit_passes(plain: TestClient, api: TestClient) -> None:
    resp = plain.post("/echo", content=b"x" * LIMIT)
    assert resp.status_code == 200
    assert resp.json()["received"] == LIMIT
    resp = plain.post("/echo", content=chunks(LIMIT))
    assert resp.status_code == 200
    assert resp.json()["received"] == LIMIT
    resp = api.post("/items", json={"name": "a", "count": 2})
    assert resp.status_code == 200
    assert resp.json()["name"] == "a"


# --- request ids ----------------------------------------------------------------------


def test_request_id_generated_when_absent(plain: TestClient) -> None:
    resp = plain.post("/echo", content=b"{}")
    rid = resp.headers["x-request-id"]
    assert HEX_ID.match(rid)
    assert resp.json()["request_id"] == rid
    assert plain.post("/echo", content=b"{}").headers["x-request-id"] != rid


def test_valid_request_id_is_used(plain: TestClient) -> None:
    resp = plain.post("/echo", content=b"{}", headers={"X-Request-ID": "client-id-123"})
    assert resp.status_code == 200
    assert resp.json()["request_id"] == "client-id-123"
    # Echoed once at most: the middleware leaves echoing a client's id to the Serve proxy.
    assert resp.headers.get_list("x-request-id") in ([], ["client-id-123"])


@pytest.mark.parametrize(
    "sent",
    ["x" * 5000, "a" * 129, "bad id; drop table", "a,b", 'q"uote', "caf\xe9", "tab\tbed", ""],
    ids=["5000-chars", "129-chars", "space-semicolon", "comma", "quote", "latin-1", "tab", "empty"],
)
def test_bad_request_id_is_replaced_and_the_replacement_echoed(
    plain: TestClient, sent: str
) -> None:
    resp = plain.post("/echo", content=b"{}", headers=[(b"x-request-id", sent.encode("latin-1"))])
    assert resp.status_code == 200  # never refused for its id
    rid = resp.json()["request_id"]
    assert HEX_ID.match(rid)
    assert resp.headers.get_list("x-request-id") == [rid]
    assert resp.json()["header"] == rid  # the app behind never sees the client's value


def test_good_request_id_is_echoed_as_sent_behind_the_serve_proxy() -> None:
    # Under Ray Serve the proxy's RequestIdMiddleware echoes the id; the Bridge must not
    # add a second copy, and must use the same id.
    from ray.serve._private.http_util import RequestIdMiddleware

    good = "Client-7._:" + "z" * 117  # 128 characters of the whole safe set
    client = TestClient(RequestIdMiddleware(starlette_app()))  # no lifespan: the proxy sends none
    resp = client.post("/echo", content=b"{}", headers={"X-Request-ID": good})
    assert resp.headers.get_list("x-request-id") == [good]
    assert resp.json()["request_id"] == good
    assert resp.json()["header"] == good


def test_request_id_on_fastapi_request_state(api: TestClient) -> None:
    resp = api.post("/items", json={"name": "a", "count": 1}, headers={"X-Request-ID": "rid-7"})
    assert resp.json()["request_id"] == "rid-7"


# --- error handlers -------------------------------------------------------------------


def assert_openai_error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    ErrorResponse.model_validate(body)
    return body["error"]


def test_invalid_json_is_400(api: TestClient) -> None:
    resp = api.post("/items", content=b'{"name": "a", ', headers={"content-type": "application/json"})
    err = assert_openai_error(resp, 400)
    assert err["code"] == "invalid_json"
    assert err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]


def test_wrong_type_is_422_with_readable_message(api: TestClient) -> None:
    err = assert_openai_error(api.post("/items", json={"name": "a", "count": "many"}), 422)
    assert err["code"] == "invalid_value"
    assert err["message"].startswith("count: ")
    assert "integer" in err["message"]


def test_union_errors_have_no_pydantic_tags(api: TestClient) -> None:
    resp = api.post("/v1/completions", json={"model": "m", "prompt": 5})
    err = assert_openai_error(resp, 422)
    message = err["message"]
    assert "prompt" in message
    for tag in ("function-after", "list[", "body.", "[type="):
        assert tag not in message
    resp = api.post(
        "/v1/completions",
        content=rb'{"model": "m", "prompt": "\ud800"}',  # a valid JSON escape, not valid text
        headers={"content-type": "application/json"},
    )
    message = assert_openai_error(resp, 422)["message"]
    assert "lone surrogate" in message and "function-after" not in message


def test_unknown_field_is_422(api: TestClient) -> None:
    err = assert_openai_error(api.post("/v1/completions", json={"model": "m", "prompt": "p", "best_of": 2}), 422)
    assert "best_of" in err["message"]


def test_unknown_route_is_404(api: TestClient) -> None:
    err = assert_openai_error(api.get("/v1/nothing-here"), 404)
    assert err["type"] == "not_found_error"
    assert err["code"] == "404"


def test_wrong_method_is_405(api: TestClient) -> None:
    err = assert_openai_error(api.get("/items"), 405)
    assert err["type"] == "invalid_request_error"


def test_unhandled_error_is_500_without_internals(api: TestClient) -> None:
    resp = api.get("/boom")
    err = assert_openai_error(resp, 500)
    assert err == {"message": "internal error", "type": "internal_error", "code": "internal_error"}
    assert "Traceback" not in resp.text
    assert "hunter2" not in resp.text
    assert "RuntimeError" not in resp.text


def test_haif_errors_keep_status_and_headers(api: TestClient) -> None:
    err = assert_openai_error(api.get("/missing-model"), 404)
    assert err["code"] == "model_not_found"
    resp = api.get("/rate-limited")
    assert assert_openai_error(resp, 429)["code"] == "rate_limit_exceeded"
    assert resp.headers["retry-after"] == "3"
