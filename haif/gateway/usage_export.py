"""Pushes usage to the billing webhook: batches, retries with backoff, at-least-once.

Each batch is POSTed as JSON::

    {"batch_id": "ub_…", "records": [{"tenant", "model", "version", "job_id",
     "prompt_tokens", "completion_tokens", "started_at", "finished_at"}, …]}

with the header ``Idempotency-Key: <batch_id>``. A batch is re-sent under the same id
until the receiver answers 2xx, so a receiver de-duplicates on ``batch_id`` (or on
``job_id`` per record). Several exporters (one per Gateway replica) share the work
through leases on the batches (``haif.store.usage``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from haif.exceptions import ConfigError, HaifError
from haif.store import usage

if TYPE_CHECKING:
    from haif.config import UsageConfig
    from haif.store.db import Database

logger = logging.getLogger("haif.usage")

MAX_ERROR_CHARS = 500


class UsageExporter:
    def __init__(
        self,
        db: Database,
        config: UsageConfig,
        client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not config.webhook_url:
            raise ConfigError("UsageExporter needs usage.webhook_url")
        self._db = db
        self._config = config
        self._client = client
        self._rng = rng or random.Random()
        self.delivered_batches = 0
        self.failed_attempts = 0

    def backoff_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**attempt)]."""
        cap = min(self._config.backoff_max_s, self._config.backoff_initial_s * 2**attempt)
        return self._rng.uniform(0, cap)

    async def run(self, stop: asyncio.Event) -> None:
        """Export until ``stop`` is set."""
        async with self._http() as client:
            while not stop.is_set():
                try:
                    sent = await self.export_once(client, stop)
                except HaifError as exc:
                    logger.warning("usage export paused: %s", exc.message)
                    sent = 0
                if not sent and await _stopped_within(stop, self._config.interval_s):
                    return

    def _http(self) -> Any:
        if self._client is not None:
            return _Borrowed(self._client)
        return httpx.AsyncClient(timeout=self._config.timeout_s)

    async def export_once(
        self, client: httpx.AsyncClient, stop: asyncio.Event | None = None
    ) -> int:
        """Claim one batch and deliver it (retrying); the number of records delivered."""
        cfg = self._config
        claimed = await self._db.run(_claim, self._db, cfg.lease_s, cfg.batch_size)
        if claimed is None:
            return 0
        batch_id, records = claimed
        payload = {"batch_id": batch_id, "records": records}
        attempt = 0
        while True:
            error = await self._post(client, batch_id, payload)
            await self._db.run(_attempt, self._db, batch_id, error, cfg.lease_s)
            if error is None:
                self.delivered_batches += 1
                return len(records)
            self.failed_attempts += 1
            delay = self.backoff_s(attempt)
            attempt += 1
            logger.warning(
                "usage batch %s not delivered (%s); retrying in %.1fs", batch_id, error, delay
            )
            if await _stopped_within(stop, delay):
                return 0  # the lease lapses and an exporter re-sends the batch later

    async def _post(
        self, client: httpx.AsyncClient, batch_id: str, payload: dict[str, Any]
    ) -> str | None:
        try:
            resp = await client.post(
                self._config.webhook_url,  # type: ignore[arg-type]
                json=payload,
                headers={"Idempotency-Key": batch_id},
                timeout=self._config.timeout_s,
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        if 200 <= resp.status_code < 300:
            return None
        return f"HTTP {resp.status_code}"


async def _stopped_within(stop: asyncio.Event | None, delay_s: float) -> bool:
    if stop is None:
        await asyncio.sleep(delay_s)
        return False
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
    except TimeoutError:
        return False
    return True


class _Borrowed:
    """A client the caller owns: used, not closed."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def __aenter__(self) -> httpx.AsyncClient:
        return self._client

    async def __aexit__(self, *_: Any) -> None:
        return None


def _claim(db: Database, lease_s: float, size: int) -> tuple[str, list[dict[str, Any]]] | None:
    with db.begin() as conn:
        return usage.claim_batch(conn, datetime.now(UTC), lease_s, size)


def _attempt(db: Database, batch_id: str, error: str | None, lease_s: float) -> None:
    with db.begin() as conn:
        usage.record_attempt(
            conn,
            batch_id,
            delivered=error is None,
            error=error,
            now=datetime.now(UTC),
            lease_s=lease_s,
        )
