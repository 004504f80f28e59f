"""HAIF's own records (not part of the OpenAI API): jobs and usage."""

from __future__ import annotations

from typing import Literal

from haif.protocol._base import _Response


class JobRecord(_Response):
    """One admitted request; completions and chat responses carry its id as their ``id``."""

    id: str
    object: Literal["job"] = "job"
    kind: Literal["completion", "chat", "embedding"]
    model: str
    version: str
    state: Literal["reserved", "running", "succeeded", "failed", "dead_lettered"]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1  # dispatches to workers, retries included
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    user: str | None = None  # the request's `user`: its end user, as the client named them


class JobList(_Response):
    object: Literal["list"] = "list"
    data: list[JobRecord]


class UsageRecord(_Response):
    """One served job, as ``haif usage export`` and the billing webhook send it."""

    tenant: str
    model: str
    version: str
    job_id: str
    prompt_tokens: int
    completion_tokens: int
    started_at: str
    finished_at: str
    caller: str | None = None  # who authenticated: token:ID, or oidc:ISSUER#SUB for a JWT


class UsageList(_Response):
    object: Literal["list"] = "list"
    data: list[UsageRecord]
