"""The admin operations over HTTP: :class:`HttpOperations` calls a deployment's admin API.

What the CLI uses when it has ``HAIF_URL`` and ``HAIF_TOKEN``: it needs no access to the
metadata store, and every change is made (and audited) by the deployment, as the token's
holder. The server's errors come back as the :class:`~haif.exceptions.HaifError` it
answered with, found by status (and by code within it), carrying the server's message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import httpx

from haif.admin.operations import DEFAULT_PAGE
from haif.exceptions import (
    AuthenticationFailed,
    Conflict,
    DeadlineExceeded,
    HaifError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServiceError,
    UnprocessableRequest,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from datetime import datetime

    from haif.admin.operations import Page, Priority, Record

__all__ = ["HttpOperations", "error_from_response", "iter_pages"]

DEFAULT_TIMEOUT_S = 30.0
# A replay runs the request again on the deployment: it may take the server's whole request
# timeout (default 300 s) and the hops around it.
REPLAY_TIMEOUT_S = 330.0
API = "/admin/v1"

# The base class of each status the admin API answers; a subclass whose ``code`` matches
# the body's is picked within it (a 404 ``model_not_found`` is a ModelNotFound).
_BY_STATUS: dict[int, type[HaifError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: UnprocessableRequest,
    429: RateLimited,
    503: ServiceError,
}


def _subclasses(cls: type[HaifError]) -> Iterator[type[HaifError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def error_from_response(response: httpx.Response) -> HaifError:
    """The HaifError an error answer stands for: its class by status (and code), the
    server's message; 5xx other than 503 (and bodies that are not HAIF's) a ServiceError."""
    status = response.status_code
    message, code = f"HTTP {status} from {response.request.url}", None
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message, code = error["message"], error.get("code")
    elif response.text:
        message = f"{message}: {response.text[:200]}"
    base = _BY_STATUS.get(status, ServiceError)
    cls = next(
        (c for c in (base, *_subclasses(base)) if c.code == code and c.status_code == status), base
    )
    if issubclass(cls, RateLimited):
        return cls(message, retry_after_s=_retry_after(response))
    return cls(message)


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(1.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def iter_pages(fetch: Callable[[str | None], Page]) -> Iterator[Record]:
    """Every record of a list, page after page: ``fetch(cursor)`` answers one page (the first
    with ``cursor=None``), until a page has no ``next_cursor``."""
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        yield from page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            return


def _segment(value: str) -> str:
    """One path segment: worker ids hold '/' and '#', so nothing is left unquoted."""
    return quote(str(value), safe="")


def _query(**params: Any) -> dict[str, str | int]:
    """The query parameters given (None: left out), as the API reads them."""
    out: dict[str, str | int] = {}
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


def _token_key(id_or_token: str) -> str:
    """What names a token in a URL: its id or prefix as given, or, for the token itself, the
    prefix computed here; the secret never goes into a URL (nor a log of one)."""
    from haif.store.tokens import PREFIX_CHARS, lookup_prefix

    value = id_or_token.strip()
    if value.isdigit() or _is_prefix(value, PREFIX_CHARS):
        return value
    prefix = lookup_prefix(value)
    if prefix is None:
        raise NotFound("no such token")
    return prefix


def _is_prefix(value: str, chars: int) -> bool:
    generated = len(value) == chars and value.isalnum() and value.islower()
    derived = value.startswith("k-") and len(value) == 18 and all(c in "0123456789abcdef" for c in value[2:])
    return generated or derived


class HttpOperations:
    """:class:`~haif.admin.operations.Operations` over a deployment's admin API.

    Args:
        url: HAIF's base URL (``http://127.0.0.1:8000``).
        token: an API key (or JWT) with the ``admin`` scope (``tenant_admin`` for its own
            tenant's tokens, jobs and usage).
        timeout_s: per request (a replay waits up to :data:`REPLAY_TIMEOUT_S`).
    """

    def __init__(self, url: str, token: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One request; its JSON answer. Raises: the HaifError the server answered with, or
        a ServiceError when it cannot be reached or answers something that is not JSON."""
        extra = {} if timeout_s is None else {"timeout": timeout_s}
        try:
            response = self._client.request(method, API + path, params=params, json=body, **extra)
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(f"HAIF at {self.url} did not answer in time: {exc}") from exc
        except httpx.TransportError as exc:
            raise ServiceError(f"cannot reach HAIF at {self.url}: {exc}") from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        if response.status_code == 204 or not response.content:
            return {}
        try:
            answer = response.json()
        except ValueError:
            raise ServiceError(
                f"HAIF at {self.url} answered {method} {path} with something that is not JSON"
            ) from None
        if not isinstance(answer, dict):
            raise ServiceError(f"HAIF at {self.url} answered {method} {path} with a JSON {type(answer).__name__}")
        return answer

    # --- tenants ---------------------------------------------------------------------------
    def create_tenant(self, name: str, limits: dict[str, int | None], priority: Priority | None = None) -> Record:
        body: dict[str, Any] = {"name": name, **limits}
        if priority is not None:
            body["priority"] = priority
        return self._call("POST", "/tenants", body=body)

    def list_tenants(
        self, cursor: str | None = None, limit: int = DEFAULT_PAGE, suspended: bool | None = None
    ) -> Page:
        return self._call("GET", "/tenants", _query(suspended=suspended, cursor=cursor, limit=limit))

    def get_tenant(self, name: str) -> Record:
        return self._call("GET", f"/tenants/{_segment(name)}")

    def update_tenant(self, name: str, changes: dict[str, Any]) -> Record:
        return self._call("PATCH", f"/tenants/{_segment(name)}", body=changes)

    # --- tokens ----------------------------------------------------------------------------
    def create_token(
        self,
        tenant: str,
        scopes: list[str] | None = None,
        models: list[str] | None = None,
        expires_in_s: float | None = None,
        name: str | None = None,
    ) -> Record:
        given = {"scopes": scopes, "models": models, "expires_in_s": expires_in_s, "name": name}
        body = {"tenant": tenant, **{k: v for k, v in given.items() if v is not None}}
        return self._call("POST", "/tokens", body=body)

    def list_tokens(
        self, tenant: str | None = None, state: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        return self._call("GET", "/tokens", _query(tenant=tenant, state=state, cursor=cursor, limit=limit))

    def revoke_token(self, id_or_token: str) -> Record:
        return self._call("DELETE", f"/tokens/{_segment(_token_key(id_or_token))}")

    # --- fleet -----------------------------------------------------------------------------
    def list_models(self) -> Page:
        return self._call("GET", "/models")

    def list_rollouts(self) -> Page:
        return self._call("GET", "/rollouts")

    def get_rollout(self, model: str) -> Record:
        return self._call("GET", f"/rollouts/{_segment(model)}")

    def set_rollout(self, model: str, version: str, weight: int) -> Record:
        return self._call("PUT", f"/rollouts/{_segment(model)}", body={"version": version, "weight": weight})

    def promote(self, model: str) -> Record:
        return self._call("POST", f"/rollouts/{_segment(model)}/promote")

    def rollback(self, model: str) -> Record:
        return self._call("POST", f"/rollouts/{_segment(model)}/rollback")

    def list_workers(
        self, model: str | None = None, state: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        return self._call("GET", "/workers", _query(model=model, state=state, cursor=cursor, limit=limit))

    def drain_worker(self, worker_id: str) -> Record:
        return self._call("POST", f"/workers/{_segment(worker_id)}/drain")

    # --- dead letters ----------------------------------------------------------------------
    def list_dead_letters(
        self, tenant: str | None = None, model: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        return self._call("GET", "/dlq", _query(tenant=tenant, model=model, cursor=cursor, limit=limit))

    def get_dead_letter(self, entry_id: str) -> Record:
        return self._call("GET", f"/dlq/{_segment(entry_id)}")

    def replay_dead_letter(self, entry_id: str, keep: bool = False) -> Record:
        return self._call(
            "POST", f"/dlq/{_segment(entry_id)}/replay", _query(keep=keep), timeout_s=REPLAY_TIMEOUT_S
        )

    def purge_dead_letter(self, entry_id: str) -> Record:
        return self._call("DELETE", f"/dlq/{_segment(entry_id)}")

    def purge_dead_letters(self) -> Record:
        return self._call("DELETE", "/dlq")

    # --- jobs and usage --------------------------------------------------------------------
    def list_jobs(
        self, tenant: str | None = None, state: str | None = None, model: str | None = None,
        cursor: str | None = None, limit: int = DEFAULT_PAGE,
    ) -> Page:
        return self._call(
            "GET", "/jobs", _query(tenant=tenant, state=state, model=model, cursor=cursor, limit=limit)
        )

    def list_usage(
        self, tenant: str | None = None, since: datetime | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page:
        return self._call("GET", "/usage", _query(tenant=tenant, since=since, cursor=cursor, limit=limit))

    # --- P2P peers -------------------------------------------------------------------------
    def list_peers(self, tenant: str | None = None, cursor: str | None = None, limit: int = DEFAULT_PAGE) -> Page:
        return self._call("GET", "/p2p/peers", _query(tenant=tenant, cursor=cursor, limit=limit))

    def add_peer(self, public_key: str, tenant: str) -> Record:
        return self._call("POST", "/p2p/peers", body={"public_key": public_key, "tenant": tenant})

    def remove_peer(self, public_key: str) -> Record:
        return self._call("DELETE", f"/p2p/peers/{_segment(public_key)}")

    # --- audit -----------------------------------------------------------------------------
    def list_audit(
        self, action: str | None = None, actor: str | None = None, target: str | None = None,
        since: datetime | None = None, cursor: str | None = None, limit: int = DEFAULT_PAGE,
    ) -> Page:
        return self._call(
            "GET", "/audit",
            _query(action=action, actor=actor, target=target, since=since, cursor=cursor, limit=limit),
        )
