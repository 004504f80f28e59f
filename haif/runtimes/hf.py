"""Hugging Face tokenizer helpers shared by the runtimes that use one (torch, vLLM)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from haif.exceptions import InvalidRequest, UnsupportedOperation

if TYPE_CHECKING:
    from haif.runtimes.base import ChatMessage, Prompt

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def render_chat(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    model_name: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Apply the tokenizer's chat template, ready for the assistant's turn; ``tools`` (OpenAI
    function tools) go to the template, which renders them if it knows how.

    Raises:
        UnsupportedOperation: the model has no chat template.
        InvalidRequest: no messages, or the template rejected them.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedOperation(f"model {model_name!r} has no chat template")
    if not messages:
        raise InvalidRequest("`messages` must not be empty")
    from jinja2 import TemplateError

    conversation = [_message(m) for m in messages]
    extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **extra
        )
    except (TemplateError, ValueError, TypeError) as exc:  # e.g. the template's raise_exception
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def encode_prompt(tokenizer: Any, prompt: Prompt, bos_id: int | None) -> list[int]:
    """The prompt's token ids as generation sees them, with at most one BOS; token ids are
    taken as they are.

    A chat template that writes the BOS itself, plus the tokenizer's own BOS, would
    otherwise give two.
    """
    if not isinstance(prompt, str):
        return list(prompt)
    ids: list[int] = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if bos_id is not None and ids[:2] == [bos_id, bos_id]:
        ids = ids[1:]
    return ids


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    """Raise InvalidRequest (400) for an id outside the vocabulary, naming it and ``what``."""
    for token in ids:
        if not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"{what}: token id {token} is not in the vocabulary (0 to {vocab_size - 1})"
            )


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's map from the printable characters of byte-level BPE back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's pieces are byte-level BPE (GPT-2's byte-to-character map)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        state = decoder.__getstate__() if decoder is not None else b""
    except (AttributeError, TypeError):
        return False
    return b'"ByteLevel"' in state if isinstance(state, bytes) else False


class TokenTexts:
    """Each token's own text and bytes, as logprobs report them (cached per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | {
            i for i, t in added.items() if getattr(t, "special", False)
        }
        self._bytes_of = _byte_level_decoder() if _byte_level(tokenizer) else {}
        self._raw: dict[int, bytes] = {}
        self._text: dict[int, str] = {}

    def raw(self, token_id: int) -> bytes:
        """The token's bytes (none for a special token: it shows no text)."""
        found = self._raw.get(token_id)
        if found is None:
            found = self._raw[token_id] = self._compute_raw(token_id)
        return found

    def text(self, token_id: int) -> str:
        """The token decoded on its own (special tokens by their names)."""
        found = self._text.get(token_id)
        if found is None:
            found = self._text[token_id] = self._tokenizer.decode([token_id])
        return found

    def _compute_raw(self, token_id: int) -> bytes:
        if token_id in self._special:
            return b""
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if piece and all(c in self._bytes_of for c in piece):
            return bytes(self._bytes_of[c] for c in piece)
        return self._tokenizer.convert_tokens_to_string([piece]).encode("utf-8")
