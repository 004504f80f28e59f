"""The admin operations, as the CLI and the admin HTTP API both see them.

Every operation answers JSON-ready dicts (the admin API's bodies, byte for byte what
``haif ... --json`` prints). Lists are pages: ``{"data": [...], "next_cursor": str | None}``;
pass ``next_cursor`` back as ``cursor`` for the next page (``None``: the last page). A
failure raises the :class:`~haif.exceptions.HaifError` the API answers with (404 unknown
tenant or token, 409 a name taken, 422 a bad value, 403 a role that may not).

Records:
- tenant: ``{"id", "name", "requests_per_minute", "tokens_per_minute", "tokens_per_day",
  "max_concurrent", "priority", "suspended", "created_at"}`` (a limit ``None``: unlimited)
- token: ``{"id", "prefix", "tenant", "name", "scopes": [...], "models": [...] | None,
  "created_at", "expires_at", "revoked_at", "state": "active" | "expired" | "revoked"}``;
  ``create_token`` adds ``"token"`` (the secret, this once)
- rollout: ``{"model", "config_version", "stable_version", "canary_version", "canary_weight",
  "weights": {version: pct}, "canary_status", "reason", "auto_rollbacks", "generation",
  "updated_at"}``
- worker: ``{"id", "model", "version", "region", "tier", "state", "capacity", "load", "peer"}``
- served model: ``{"model", "runtime", "device", "versions": {version: {"weight", "workers":
  {state: n}}}, "rollout": rollout}``
- drain: ``{"worker_id", "requested_at", "state"}``
- dead letter: summary ``{"id", "tenant", "model", "error", "error_type", "error_code",
  "attempts", "trace_id", "dead_at"}``; ``get_dead_letter`` the whole entry, body included
- job: ``{"id", "tenant", "kind", "model", "version", "state", "caller", "prompt_tokens",
  "completion_tokens", "worker", "gateway", "error", "created_at", "started_at", "finished_at"}``
- usage: the ``haif usage export`` row (:data:`haif.store.usage.EXPORT_FIELDS`)
- peer: ``{"public_key", "tenant", "created_at", "source": "store" | "config"}``
- audit: ``{"id", "at", "actor", "action", "target", "before", "after", "request_id",
  "client"}`` (``actor``: ``"token:ID"``, ``"oidc:ISSUER#SUB"``, or ``"cli:USER"``)

Times are ISO 8601 in UTC with seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, Protocol

Record = dict[str, Any]
Page = dict[str, Any]  # {"data": [Record], "next_cursor": str | None}
Priority = Literal["high", "normal", "low"]
QUOTA_FIELDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_concurrent")
DEFAULT_PAGE = 100
MAX_PAGE = 1000


def iso(value: datetime | None) -> str | None:
    """A record's time: ISO 8601 in UTC, to the second (None stays None)."""
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


class Operations(Protocol):
    # --- tenants ---------------------------------------------------------------------------
    def create_tenant(self, name: str, limits: dict[str, int | None], priority: Priority | None = None) -> Record:
        """``limits``: the quota fields given (absent: unlimited)."""
        ...

    def list_tenants(
        self, cursor: str | None = None, limit: int = DEFAULT_PAGE, suspended: bool | None = None
    ) -> Page: ...

    def get_tenant(self, name: str) -> Record: ...

    def update_tenant(self, name: str, changes: dict[str, Any]) -> Record:
        """``changes``: any of the quota fields (``None``: unlimited), ``priority``, ``suspended``."""
        ...

    # --- tokens ----------------------------------------------------------------------------
    def create_token(
        self,
        tenant: str,
        scopes: list[str] | None = None,
        models: list[str] | None = None,
        expires_in_s: float | None = None,
        name: str | None = None,
    ) -> Record: ...

    def list_tokens(
        self,
        tenant: str | None = None,
        state: str | None = None,
        cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page: ...

    def revoke_token(self, id_or_token: str) -> Record: ...

    # --- fleet -----------------------------------------------------------------------------
    def list_models(self) -> Page: ...

    def list_rollouts(self) -> Page: ...

    def get_rollout(self, model: str) -> Record: ...

    def set_rollout(self, model: str, version: str, weight: int) -> Record: ...

    def promote(self, model: str) -> Record: ...

    def rollback(self, model: str) -> Record: ...

    def list_workers(
        self, model: str | None = None, state: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page: ...

    def drain_worker(self, worker_id: str) -> Record: ...

    # --- dead letters ----------------------------------------------------------------------
    def list_dead_letters(
        self, tenant: str | None = None, model: str | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page: ...

    def get_dead_letter(self, entry_id: str) -> Record: ...

    def replay_dead_letter(self, entry_id: str, keep: bool = False) -> Record:
        """``{"id", "job_id", "state", "executed"}``."""
        ...

    def purge_dead_letter(self, entry_id: str) -> Record:
        """``{"id", "purged": true}``."""
        ...

    def purge_dead_letters(self) -> Record:
        """Every entry: ``{"purged": n}``."""
        ...

    # --- jobs and usage --------------------------------------------------------------------
    def list_jobs(
        self, tenant: str | None = None, state: str | None = None, model: str | None = None,
        cursor: str | None = None, limit: int = DEFAULT_PAGE,
    ) -> Page: ...

    def list_usage(
        self, tenant: str | None = None, since: datetime | None = None, cursor: str | None = None,
        limit: int = DEFAULT_PAGE,
    ) -> Page: ...

    # --- P2P peers -------------------------------------------------------------------------
    def list_peers(self, tenant: str | None = None, cursor: str | None = None, limit: int = DEFAULT_PAGE) -> Page: ...

    def add_peer(self, public_key: str, tenant: str) -> Record: ...

    def remove_peer(self, public_key: str) -> Record: ...

    # --- audit -----------------------------------------------------------------------------
    def list_audit(
        self, action: str | None = None, actor: str | None = None, target: str | None = None,
        since: datetime | None = None, cursor: str | None = None, limit: int = DEFAULT_PAGE,
    ) -> Page: ...
