"""The CLI over HTTP: HttpOperations' requests and error mapping (httpx.MockTransport), where
the CLI gets its operations (--url/--token, HAIF_URL/HAIF_TOKEN, profiles), and commands run
against a loopback stub of the admin API."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from typer.testing import CliRunner

from haif.admin.client import HttpOperations, iter_pages
from haif.cli._common import Remote, resolve_remote
from haif.cli.main import app
from haif.exceptions import (
    AuthenticationFailed,
    ConfigError,
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ServiceError,
    StoreUnavailable,
    UnprocessableRequest,
)
from tests.support.loopback import LoopbackServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.unit

URL = "http://haif.test"
SECRET = "haif_abcdefghijkl_" + "s" * 43


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"message": message, "type": "x", "code": code}}, headers=headers
    )


def _ops(handler: Callable[[httpx.Request], httpx.Response]) -> HttpOperations:
    return HttpOperations(URL, "tok-1", transport=httpx.MockTransport(handler))


# --- HttpOperations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_request", InvalidRequest),
        (401, "invalid_api_key", AuthenticationFailed),
        (403, "permission_denied", PermissionDenied),
        (404, "not_found", NotFound),
        (404, "model_not_found", ModelNotFound),
        (409, "conflict", Conflict),
        (422, "invalid_value", UnprocessableRequest),
        (429, "rate_limit_exceeded", RateLimited),
        (429, "insufficient_quota", QuotaExceeded),
        (503, "store_unavailable", StoreUnavailable),
        (503, "model_not_ready", ServiceError),
        (500, "internal_error", ServiceError),
        (504, "timeout", DeadlineExceeded),
        (418, "teapot", ServiceError),
    ],
)
def test_an_error_answer_becomes_its_haif_error(status: int, code: str, cls: type) -> None:
    ops = _ops(lambda _: _error(status, f"the server says {code}", code))
    with pytest.raises(cls) as caught:
        ops.get_tenant("acme")
    assert caught.value.message == f"the server says {code}"
    assert caught.value.status_code == status or cls is ServiceError


def test_the_classes_are_exact_where_the_status_alone_decides() -> None:
    with pytest.raises(NotFound) as caught:
        _ops(lambda _: _error(404, "no tenant named 'x'", "something_new")).get_tenant("x")
    assert type(caught.value) is NotFound
    with pytest.raises(ServiceError) as caught:
        _ops(lambda _: _error(503, "down", "service_unavailable")).list_models()
    assert type(caught.value) is ServiceError and not isinstance(caught.value, StoreUnavailable)


def test_retry_after_and_a_body_that_is_not_haifs() -> None:
    with pytest.raises(RateLimited) as caught:
        _ops(lambda _: _error(429, "slow down", "rate_limit_exceeded", {"Retry-After": "7"})).list_jobs()
    assert caught.value.retry_after_s == 7
    with pytest.raises(ServiceError, match="HTTP 502 .*bad gateway"):
        _ops(lambda _: httpx.Response(502, text="bad gateway")).list_jobs()
    with pytest.raises(ServiceError, match="not JSON"):
        _ops(lambda _: httpx.Response(200, text="<html>")).list_jobs()


def test_an_unreachable_server_is_a_service_error_naming_the_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ServiceError, match=f"cannot reach HAIF at {URL}: connection refused"):
        _ops(refuse).list_tenants()


def test_requests_carry_the_token_and_only_the_parameters_given() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [], "next_cursor": None})

    ops = _ops(record)
    ops.list_tokens(tenant="acme")
    ops.list_tenants(suspended=False, cursor="c1", limit=5)
    from datetime import UTC, datetime

    ops.list_usage(since=datetime(2030, 1, 1, tzinfo=UTC))
    ops.create_tenant("acme", {"requests_per_minute": 5, "max_concurrent": None}, "high")
    ops.create_token("acme", scopes=["admin"])
    ops.replay_dead_letter("cmpl-1", keep=True)
    ops.update_tenant("acme", {"suspended": True})
    assert all(r.headers["authorization"] == "Bearer tok-1" for r in seen)
    assert [(r.method, r.url.path, dict(r.url.params)) for r in seen[:3]] == [
        ("GET", "/admin/v1/tokens", {"tenant": "acme", "limit": "100"}),
        ("GET", "/admin/v1/tenants", {"suspended": "false", "cursor": "c1", "limit": "5"}),
        ("GET", "/admin/v1/usage", {"since": "2030-01-01T00:00:00+00:00", "limit": "100"}),
    ]
    assert json.loads(seen[3].content) == {
        "name": "acme", "requests_per_minute": 5, "max_concurrent": None, "priority": "high"
    }
    assert json.loads(seen[4].content) == {"tenant": "acme", "scopes": ["admin"]}
    assert (seen[5].method, seen[5].url.path, seen[5].url.params["keep"]) == (
        "POST", "/admin/v1/dlq/cmpl-1/replay", "true"
    )
    assert (seen[6].method, json.loads(seen[6].content)) == ("PATCH", {"suspended": True})


def test_ids_are_quoted_and_a_secret_never_goes_into_a_url() -> None:
    paths: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"id": 1, "prefix": "abcdefghijkl"})

    ops = _ops(record)
    ops.drain_worker("tiny-llama/local/0#abcdef12")
    ops.revoke_token(SECRET)
    ops.revoke_token("42")
    ops.revoke_token("abcdefghijkl")
    assert paths == [
        "/admin/v1/workers/tiny-llama%2Flocal%2F0%23abcdef12/drain",
        "/admin/v1/tokens/abcdefghijkl",
        "/admin/v1/tokens/42",
        "/admin/v1/tokens/abcdefghijkl",
    ]
    with pytest.raises(NotFound, match="no such token"):
        ops.revoke_token("haif_malformed")  # cannot be a token: nothing is sent
    assert len(paths) == 4


def test_iter_pages_follows_the_cursor() -> None:
    pages = {None: {"data": [1, 2], "next_cursor": "b"}, "b": {"data": [3], "next_cursor": None}}
    asked: list[str | None] = []

    def fetch(cursor: str | None) -> dict[str, Any]:
        asked.append(cursor)
        return pages[cursor]

    assert list(iter_pages(fetch)) == [1, 2, 3] and asked == [None, "b"]


# --- where the CLI gets its operations -------------------------------------------------------------


@pytest.fixture
def xdg(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def _profiles(env: dict[str, str], text: str) -> None:
    path = Path(env["XDG_CONFIG_HOME"]) / "haif" / "profiles.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_nothing_given_is_the_database(xdg: dict[str, str]) -> None:
    assert resolve_remote(None, None, None, xdg) is None
    _profiles(xdg, '[staging]\nurl = "http://staging:8000"\ntoken = "t-s"\n')
    assert resolve_remote(None, None, None, xdg) is None  # no [default]


def test_flags_profiles_and_the_default_profile(xdg: dict[str, str]) -> None:
    assert resolve_remote("http://a", "t", None, xdg) == Remote("http://a", "t")
    _profiles(
        xdg,
        '[default]\nurl = "http://prod:8000"\ntoken = "t-prod"\n'
        '[staging]\nurl = "http://staging:8000"\ntoken = "t-s"\n',
    )
    assert resolve_remote(None, None, None, xdg) == Remote("http://prod:8000", "t-prod")
    assert resolve_remote(None, None, "staging", xdg) == Remote("http://staging:8000", "t-s")
    assert resolve_remote(None, "mine", "staging", xdg) == Remote("http://staging:8000", "mine")
    assert resolve_remote("http://a", "t", None, xdg) == Remote("http://a", "t")  # no [default] then
    with pytest.raises(ConfigError, match=r"no profile 'nope' in .*profiles: default, staging"):
        resolve_remote(None, None, "nope", xdg)


def test_half_an_address_is_a_usage_error(xdg: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="no token"):
        resolve_remote("http://a", None, None, xdg)
    with pytest.raises(ConfigError, match="no URL"):
        resolve_remote(None, "t", None, xdg)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_remote(None, None, "prod", xdg)
    _profiles(xdg, "[default\n")
    with pytest.raises(ConfigError, match="cannot read profiles"):
        resolve_remote(None, None, None, xdg)


# --- commands against a stub of the admin API --------------------------------------------------------


class AdminStub(LoopbackServer):
    """Answers ``routes[(method, path)]`` (status, body) and records what it was asked."""

    def __init__(self, routes: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.routes, self.seen = routes, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stub.seen.append((self.command, self.path, self.headers.get("authorization"), body))
                status, answer = stub.routes.get(
                    (self.command, self.path.split("?")[0]),
                    (404, {"error": {"message": "no route", "type": "x", "code": "not_found"}}),
                )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.url = self._listen(Handler)


TENANT = {"id": 3, "name": "acme", "requests_per_minute": 5, "tokens_per_minute": None,
          "tokens_per_day": None, "max_concurrent": None, "priority": "high", "suspended": False,
          "created_at": "2030-01-01T00:00:00+00:00"}
WORKER = {"id": "echo/local/0#ab", "model": "echo", "version": "a", "region": "local", "tier": "default",
          "state": "ready", "capacity": 8, "load": 1, "peer": None}


@pytest.fixture
def stub() -> Iterator[AdminStub]:
    routes = {
        ("GET", "/admin/v1/tenants"): (200, {"data": [TENANT], "next_cursor": None}),
        ("POST", "/admin/v1/tenants"): (409, {"error": {"message": "tenant 'acme' already exists",
                                                       "type": "conflict_error", "code": "conflict"}}),
        ("PATCH", "/admin/v1/tenants/acme"): (200, {**TENANT, "suspended": True}),
        ("GET", "/admin/v1/workers"): (200, {"data": [WORKER], "next_cursor": None}),
        ("POST", "/admin/v1/workers/echo%2Flocal%2F0%23ab/drain"): (200, {"worker_id": WORKER["id"]}),
    }
    with AdminStub(routes) as server:
        yield server


def cli(*args: str, code: int = 0, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def test_commands_run_over_the_admin_api_given_url_and_token(stub: AdminStub, tmp_path: Path) -> None:
    no_config = ["--config", str(tmp_path / "absent.yaml")]  # over HTTP no config is read
    listed = cli("tenants", "list", "--json", "--url", stub.url, "--token", "t-1", *no_config)
    assert json.loads(listed)["name"] == "acme"
    env = {"HAIF_URL": stub.url, "HAIF_TOKEN": "t-env"}
    assert "already exists" in cli("tenants", "create", "acme", *no_config, code=1, env=env)
    assert "suspended tenant acme" in cli("tenants", "suspend", "acme", *no_config, env=env)
    assert "echo/local/0#ab" in cli("workers", "list", *no_config, env=env)
    assert "drain of echo/local/0#ab requested" in cli("workers", "drain", WORKER["id"], *no_config, env=env)
    assert [s[2] for s in stub.seen] == ["Bearer t-1"] + ["Bearer t-env"] * 4
    assert stub.seen[2][3] == {"suspended": True}
    assert stub.seen[1][3] == {"name": "acme"}


def test_a_profile_names_the_deployment(stub: AdminStub, tmp_path: Path) -> None:
    profiles = tmp_path / "xdg" / "haif" / "profiles.toml"
    profiles.parent.mkdir(parents=True)
    profiles.write_text(f'[default]\nurl = "{stub.url}"\ntoken = "t-default"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert "acme" in cli("tenants", "list", "--config", str(tmp_path / "absent.yaml"), env=env)
    assert stub.seen[-1][2] == "Bearer t-default"


def test_without_an_admin_api(tmp_path: Path) -> None:
    cfg = tmp_path / "haif.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{tmp_path / 'h.db'}'}}\n")
    assert "needs a running deployment" in cli("workers", "list", "--config", str(cfg), code=2)
    assert "no token" in cli("tenants", "list", "--url", "http://127.0.0.1:9", "--config", str(cfg), code=2)
    out = cli("tenants", "list", "--url", "http://127.0.0.1:9", "--token", "t", "--config", str(cfg), code=1)
    assert "cannot reach HAIF at http://127.0.0.1:9" in out


def test_admin_bootstrap_prints_an_admin_token_last(tmp_path: Path) -> None:
    cfg = tmp_path / "haif.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{tmp_path / 'h.db'}'}}\n")
    out = cli("admin", "bootstrap", "--tenant", "ops", "--config", str(cfg))
    assert "created tenant ops" in out
    token = out.strip().splitlines()[-1]
    assert token.startswith("haif_")
    again = cli("admin", "bootstrap", "--tenant", "ops", "--config", str(cfg))
    assert "created tenant" not in again  # the tenant is there: only a new token
    tokens = [json.loads(line) for line in cli("tokens", "list", "--json", "--config", str(cfg)).splitlines()]
    assert [(t["tenant"], t["scopes"]) for t in tokens] == [("ops", "admin"), ("ops", "admin")]
    audit = [json.loads(line) for line in cli("audit", "list", "--json", "--config", str(cfg)).splitlines()]
    assert [a["action"] for a in audit][-2:] == ["token.create", "tenant.create"]
    assert all(a["actor"].startswith("cli:") for a in audit)


def test_rollout_and_replay_over_the_admin_api(tmp_path: Path) -> None:
    rollout = {"model": "echo", "config_version": "a", "stable_version": "a", "canary_version": "b",
               "canary_weight": 10, "weights": {"a": 90, "b": 10}, "canary_status": "ready", "reason": None,
               "auto_rollbacks": 0, "generation": 2, "updated_at": "2030-01-01T00:00:00+00:00"}
    promoted = {**rollout, "stable_version": "b", "canary_version": None, "weights": {"b": 100}, "generation": 3}
    routes = {
        ("GET", "/admin/v1/rollouts/echo"): (200, rollout),
        ("POST", "/admin/v1/rollouts/echo/promote"): (200, promoted),
        ("POST", "/admin/v1/dlq/cmpl-1/replay"): (200, {"id": "cmpl-1", "job_id": "cmpl-1", "state": "done",
                                                       "executed": True}),
    }
    with AdminStub(routes) as stub:
        env = {"HAIF_URL": stub.url, "HAIF_TOKEN": "t"}
        no_config = ["--config", str(tmp_path / "absent.yaml")]
        out = cli("rollout", "promote", "echo", *no_config, env=env)
        assert "promoted echo: version b at 100% (generation 3)" in out and "drains version a's workers" in out
        out = cli("dlq", "replay", "cmpl-1", "--keep", *no_config, env=env)
        assert "replayed cmpl-1: job cmpl-1 done (executed)" in out
        assert stub.seen[-1][1] == "/admin/v1/dlq/cmpl-1/replay?keep=true"
        assert "no route" in cli("rollout", "status", "nope", *no_config, code=1, env=env)
