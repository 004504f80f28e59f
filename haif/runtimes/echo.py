"""The echo runtime: deterministic, no model. It answers with the prompt itself.

Tokens are whitespace-delimited words (with their trailing whitespace). A completion
is the prompt's tokens, cut at ``max_tokens`` (``finish_reason="length"``) or at a
stop string; otherwise it ends with ``finish_reason="stop"``. Chat messages render as
their contents joined by newlines. Used by tests and the overhead benchmark, where
the platform and not a model is what is measured.

It honours what a model that always says the same can: sampling knobs that only reshape
a distribution (its own is certain), ``echo``, logprobs (each token's is 0, the only
alternative the token itself) and tools that the answer may leave alone (``auto``: hermes
markup in the prompt comes back as a call). It has no vocabulary, no logits and no
grammar, so it refuses by name token-id prompts, ``logit_bias``, penalties,
``min_tokens``, ``stop_token_ids``, ``top_logprobs`` above 1, ``response_format`` and
forced tool calls.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np

from haif.exceptions import UnsupportedParameter
from haif.runtimes.base import (
    ChatMessage,
    EmbeddingOutput,
    LogprobsAligner,
    Prompt,
    Runtime,
    SamplingParams,
    StopMatcher,
    StreamEvent,
    TokenLogprob,
    TopToken,
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

    def render_chat(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] | None = None
    ) -> str:
        return "\n".join(m.content for m in messages)

    def unsupported(self, params: SamplingParams, prompts: Sequence[Prompt]) -> list[str]:
        refused = [
            name for name, used in (
                ("prompt (token ids)", any(not isinstance(p, str) for p in prompts)),
                ("logit_bias", bool(params.logit_bias)),
                ("presence_penalty", bool(params.presence_penalty)),
                ("frequency_penalty", bool(params.frequency_penalty)),
                ("repetition_penalty", params.repetition_penalty != 1.0),
                ("min_tokens", params.min_tokens > 0),
                ("stop_token_ids", bool(params.stop_token_ids)),
                ("top_logprobs above 1", (params.logprobs or 0) > 1),
            ) if used
        ]
        if params.guide is not None:
            refused.append(params.guide.param)
        return refused

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[StreamEvent]:
        if not isinstance(prompt, str):
            raise UnsupportedParameter(f"model {self.ctx.model.name!r} (runtime echo) takes no token ids")
        tokens = tokenize(prompt)
        self.check_prompt(len(tokens), params.max_tokens)
        delay_s = self.ctx.model.echo.token_delay_ms / 1000.0
        matcher = StopMatcher(params.stop)
        logprobs = LogprobsAligner() if params.logprobs is not None else None
        if params.echo:
            entries = tuple(_certain(t, params, first=i == 0) for i, t in enumerate(tokens)) if logprobs else ()
            yield StreamEvent(prompt, 0, len(tokens), logprobs=entries)
        produced = 0
        for token in tokens[: params.max_tokens]:
            if delay_s:
                await asyncio.sleep(delay_s)
            produced += 1
            if logprobs is not None:
                logprobs.add(_certain(token, params))
            text, stopped = matcher.feed(token)
            if stopped:
                entries = logprobs.release(len(text), final=True) if logprobs else ()
                yield StreamEvent(text, produced, len(tokens), "stop", logprobs=entries)
                return
            if text:
                entries = logprobs.release(len(text)) if logprobs else ()
                yield StreamEvent(text, produced, len(tokens), logprobs=entries)
        reason = "length" if len(tokens) > params.max_tokens else "stop"
        text = matcher.flush()
        entries = logprobs.release(len(text), final=True) if logprobs else ()
        yield StreamEvent(text, produced, len(tokens), reason, logprobs=entries)

    async def embed(self, texts: Sequence[Prompt]) -> EmbeddingOutput:
        """A deterministic unit vector per text, from its bytes (for tests only)."""
        if any(not isinstance(t, str) for t in texts):
            raise UnsupportedParameter(f"model {self.ctx.model.name!r} (runtime echo) takes no token ids")
        vectors = np.zeros((len(texts), ECHO_EMBEDDING_DIM), dtype=np.float32)
        total = 0
        for row, text in enumerate(texts):
            total += len(tokenize(text))
            data = np.frombuffer(text.encode("utf-8") or b"\0", dtype=np.uint8)
            for i in range(ECHO_EMBEDDING_DIM):
                vectors[row, i] = float(data[i::ECHO_EMBEDDING_DIM].sum()) + 1.0
            vectors[row] /= np.linalg.norm(vectors[row])
        return EmbeddingOutput(vectors=vectors, prompt_tokens=total)


def _certain(token: str, params: SamplingParams, *, first: bool = False) -> TokenLogprob:
    """A token echo is sure of: log probability 0, itself the one alternative."""
    raw = token.encode("utf-8")
    top = (TopToken(token, 0.0, raw),) if params.logprobs else ()
    return TokenLogprob(token, None if first else 0.0, raw, () if first else top)
