"""What every protocol model shares: text that any model can read, ids, and the two bases."""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints

MAX_ID_CHARS = 256
MAX_STOP_CHARS = 256
MAX_CHOICES = 128  # `n`, as OpenAI bounds it
MAX_TOKEN_ID = 2**31 - 1


def _valid_unicode(value: str) -> str:
    """Reject lone surrogates (valid JSON escapes, but not text any model can read)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogate code points)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
ModelName = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
StopString = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
# A token id of the model's vocabulary; whether it is one is the runtime's to say (400).
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# OpenAI's function names: what its API accepts in a tool's name.
FunctionName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
