"""The echo runtime: deterministic, no model. It answers with the prompt itself.

Tokens are whitespace-delimited words (with their trailing whitespace). A completion
is the prompt's tokens, cut at ``max_tokens`` (``finish_reason="length"``) or at a
stop string; otherwise it ends with ``finish_reason="stop"``. Chat messages render as
their contents joined by newlines. Used by tests and the overhead benchmark, where
the platform and not a model is what is measured.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence

import numpy as np

from haif.runtimes.base import (
    ChatMessage,
    EmbeddingOutput,
    Runtime,
    SamplingParams,
    StopMatcher,
    StreamEvent,
)

_TOKEN = re.compile(r"\S+\s*|\s+")
ECHO_EMBEDDING_DIM = 8


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


class EchoRuntime(Runtime):
    name = "echo"
    capabilities = frozenset({"generate", "embed"})

    async def load(self) -> None:
        return None

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "\n".join(m.content for m in messages)

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        tokens = tokenize(prompt)
        self.check_prompt(len(tokens), params.max_tokens)
        delay_s = self.ctx.model.token_delay_ms / 1000.0
        matcher = StopMatcher(params.stop)
        produced = 0
        for token in tokens[: params.max_tokens]:
            if delay_s:
                await asyncio.sleep(delay_s)
            produced += 1
            text, stopped = matcher.feed(token)
            if stopped:
                yield StreamEvent(text, produced, len(tokens), "stop")
                return
            if text:
                yield StreamEvent(text, produced, len(tokens))
        reason = "length" if len(tokens) > params.max_tokens else "stop"
        yield StreamEvent(matcher.flush(), produced, len(tokens), reason)

    async def embed(self, texts: Sequence[str]) -> EmbeddingOutput:
        """A deterministic unit vector per text, from its bytes (for tests only)."""
        vectors = np.zeros((len(texts), ECHO_EMBEDDING_DIM), dtype=np.float32)
        total = 0
        for row, text in enumerate(texts):
            total += len(tokenize(text))
            data = np.frombuffer(text.encode("utf-8") or b"\0", dtype=np.uint8)
            for i in range(ECHO_EMBEDDING_DIM):
                vectors[row, i] = float(data[i::ECHO_EMBEDDING_DIM].sum()) + 1.0
            vectors[row] /= np.linalg.norm(vectors[row])
        return EmbeddingOutput(vectors=vectors, prompt_tokens=total)
