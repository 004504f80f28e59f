"""Idempotency-Key: same key + same body → the stored response; different body → 409.

The key is claimed in the reservation transaction (a unique index on tenant + key),
so of any number of concurrent duplicates exactly one executes. The others wait for
its job to close and answer with the response stored on the job row: on the same
replica they wait on the executing request itself; elsewhere they poll the row.
Streaming requests cannot carry a key (400): a stream is not replayable as sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from haif.envelope import EmbeddingResult
from haif.exceptions import DeadlineExceeded, InvalidRequest, ServiceError
from haif.protocol import ChatCompletionResponse, CompletionResponse

if TYPE_CHECKING:
    from haif.envelope import Body, Kind
    from haif.store.db import Database

_KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


def check_key(key: str, max_chars: int) -> str:
    """Raises: InvalidRequest (empty, too long, or not printable ASCII)."""
    if not key or len(key) > max_chars or not _KEY.match(key):
        raise InvalidRequest(f"Idempotency-Key must be 1-{max_chars} printable ASCII characters")
    return key


def request_hash(kind: Kind, body: Body) -> str:
    """A digest of the request as the API reads it (JSON key order and spacing do not matter)."""
    canonical = json.dumps(
        {"kind": kind, "body": body.model_dump(mode="json", exclude_unset=True)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def encode_response(kind: Kind, result: Any, vectors: Any = None) -> str:
    """The response as stored on the job row (embeddings: float32 bytes, bit-exact)."""
    if kind == "embedding":
        array = np.ascontiguousarray(np.asarray(vectors, dtype="<f4"))
        return json.dumps(
            {
                "model": result.model,
                "prompt_tokens": result.prompt_tokens,
                "shape": list(array.shape),
                "vectors": base64.b64encode(array.tobytes()).decode("ascii"),
            }
        )
    return result.model_dump_json()


def decode_response(kind: Kind, stored: str) -> Any:
    if kind == "embedding":
        data = json.loads(stored)
        vectors = np.frombuffer(base64.b64decode(data["vectors"]), dtype="<f4").reshape(
            data["shape"]
        )
        return EmbeddingResult(
            model=data["model"], vectors=vectors, prompt_tokens=data["prompt_tokens"]
        )
    model = ChatCompletionResponse if kind == "chat" else CompletionResponse
    return model.model_validate_json(stored)


def _job_state(db: Database, job_id: str) -> tuple[str, str | None] | None:
    from sqlalchemy import select

    from haif.store.models import Job

    with db.connect() as conn:
        row = conn.execute(select(Job.state, Job.response).where(Job.id == job_id)).one_or_none()
    return (row.state, row.response) if row is not None else None


async def wait_for_job(
    db: Database, job_id: str, deadline: float, poll_s: float, local: asyncio.Future[Any] | None
) -> tuple[str, str | None]:
    """Wait until the job that holds a key closes; return (state, stored response).

    Raises:
        DeadlineExceeded: the request's deadline passed first.
    """
    if local is not None:  # resolved (never failed) once the executing request has settled
        try:
            await asyncio.wait_for(asyncio.shield(local), timeout=max(0.0, deadline - time.time()))
        except TimeoutError:
            raise DeadlineExceeded(
                "the request with this Idempotency-Key is still running"
            ) from None
    delay = poll_s
    while True:
        found = await db.run(_job_state, db, job_id)
        if found is None:
            raise ServiceError("the job of this Idempotency-Key disappeared; retry")
        state, response = found
        if state not in ("reserved", "running"):
            return state, response
        left = deadline - time.time()
        if left <= 0:
            raise DeadlineExceeded("the request with this Idempotency-Key is still running")
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 1.5, 1.0)
