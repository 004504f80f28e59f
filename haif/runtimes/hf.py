"""Hugging Face tokenizer helpers shared by the runtimes that use one (torch, vLLM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from haif.exceptions import InvalidRequest, UnsupportedOperation

if TYPE_CHECKING:
    from haif.runtimes.base import ChatMessage


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage], model_name: str) -> str:
    """Apply the tokenizer's chat template, ready for the assistant's turn.

    Raises:
        UnsupportedOperation: the model has no chat template.
        InvalidRequest: no messages, or the template rejected them.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedOperation(f"model {model_name!r} has no chat template")
    if not messages:
        raise InvalidRequest("`messages` must not be empty")
    from jinja2 import TemplateError

    conversation = [
        {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
        for m in messages
    ]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError) as exc:  # e.g. the template's raise_exception
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc


def encode_prompt(tokenizer: Any, prompt: str, bos_id: int | None) -> list[int]:
    """The prompt's token ids as generation sees them, with at most one BOS.

    A chat template that writes the BOS itself, plus the tokenizer's own BOS, would
    otherwise give two.
    """
    ids: list[int] = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if bos_id is not None and ids[:2] == [bos_id, bos_id]:
        ids = ids[1:]
    return ids
