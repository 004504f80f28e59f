"""Cursor pagination of the admin lists: a keyset cursor, opaque to the caller.

A cursor is the sort key of the last row of a page, JSON in URL-safe base64: the next
page starts after it, so rows added or removed meanwhile neither repeat nor skip one.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any

from haif.admin.operations import MAX_PAGE, Page
from haif.exceptions import InvalidRequest

MAX_CURSOR_CHARS = 512


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}")
    return limit


def encode(*key: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode()


def decode(cursor: str | None, types: Sequence[type]) -> list[Any] | None:
    """The key ``cursor`` carries (``types``: of each part), None for the first page.

    Raises:
        InvalidRequest: not a cursor of this list.
    """
    if cursor is None:
        return None
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError
        key = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        if not isinstance(key, list) or len(key) != len(types):
            raise ValueError
        if not all(isinstance(part, kind) and not isinstance(part, bool) for part, kind in zip(key, types, strict=True)):
            raise ValueError
    except (ValueError, UnicodeError, binascii.Error):
        raise InvalidRequest("cursor is not one this list gave out") from None
    return key


def page(rows: Sequence[Any], limit: int, record: Callable[[Any], dict[str, Any]],
         key: Callable[[Any], tuple[Any, ...]]) -> Page:
    """A page of ``limit`` rows out of ``rows`` (fetched with one more, to know whether a
    next page exists)."""
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "data": [record(r) for r in rows],
        "next_cursor": encode(*key(rows[-1])) if more and rows else None,
    }
