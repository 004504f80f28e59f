"""One generated sequence's text, as the torch runtime builds it token by token.

``IncrementalDecoder`` turns a growing token list into text deltas; ``GeneratedSequence`` takes
each sampled token of one request's row and makes its stream event: the text (stop
strings held back and cut), the finish (EOS, ``stop_token_ids``, a complete grammar, a stop
string, ``max_tokens``) and, when asked, the tokens' logprobs aligned with the text.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

from haif.runtimes.base import (
    FinishReason,
    LogprobsAligner,
    StopMatcher,
    StreamEvent,
    TokenLogprob,
    TopToken,
)

if TYPE_CHECKING:
    from haif.runtimes.base import SamplingParams
    from haif.runtimes.hf import TokenTexts
    from haif.runtimes.sampling import Logprobs, RowState


class IncrementalDecoder:
    """Text of a growing token list, one delta per token, correct for byte-level BPE.

    Decodes the tokens since the last emitted chunk together with that chunk (context
    for tokenizers whose pieces depend on their neighbours) and emits the new suffix;
    while the text ends in U+FFFD, a multi-byte character is incomplete and is held back.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(done) :]


def top_tokens(texts: TokenTexts, top: Seq[tuple[int, float]]) -> tuple[TopToken, ...]:
    return tuple(TopToken(texts.text(t), lp, texts.raw(t)) for t, lp in top)


def prompt_logprobs(
    tokenizer: Any, texts: TokenTexts, ids: Seq[int], chosen: Seq[float], top: Seq[Seq[tuple[int, float]]]
) -> tuple[TokenLogprob, ...]:
    """The entries of an echoed prompt: its first token has no logprob (nothing before it);
    ``chosen[i]`` and ``top[i]`` are those of token ``i + 1``."""
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(t) for t in ids]
    if deltas:
        deltas[-1] += decoder.flush()
    out = [TokenLogprob(deltas[0], None, texts.raw(ids[0]))] if ids else []
    for i in range(1, len(ids)):
        out.append(TokenLogprob(deltas[i], chosen[i - 1], texts.raw(ids[i]), top_tokens(texts, top[i - 1])))
    return tuple(out)


class GeneratedSequence:
    """One request's row in a running batch (worker thread only)."""

    def __init__(
        self, state: RowState, prompt_tokens: int, tokenizer: Any, texts: TokenTexts,
        eos_ids: frozenset[int],
    ) -> None:
        self.state = state
        self.params: SamplingParams = state.params
        self.prompt_tokens = prompt_tokens
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(self.params.stop)
        self.aligner = LogprobsAligner() if self.params.logprobs is not None else None
        self._texts = texts
        self._eos = frozenset() if self.params.ignore_eos else eos_ids
        self._stop_ids = frozenset(self.params.stop_token_ids)
        self.done = False
        self.count = 0

    def advance(self, token_id: int, logprobs: Logprobs | None = None) -> StreamEvent | None:
        """Take the next token; return the event it makes (the final one sets ``done``)."""
        # EOS and stop tokens end the sequence and count, but show no text.
        ends = token_id in self._eos or token_id in self._stop_ids
        guided = self.state.matcher
        finished_grammar = guided is not None and guided.terminated
        delta = "" if ends else self.decoder.push(token_id)
        self.count += 1
        n = self.count
        last = ends or finished_grammar or n >= self.params.max_tokens
        if last:
            delta += self.decoder.flush()
        if self.aligner is not None and logprobs is not None:
            raw = b"" if ends else self._texts.raw(token_id)
            top = top_tokens(self._texts, logprobs.top)
            self.aligner.add(TokenLogprob(delta, logprobs.logprob, raw, top))
        text, stopped = self.matcher.feed(delta)
        reason: FinishReason | None = None
        if stopped or ends or finished_grammar:
            reason = "stop"
        elif n >= self.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.done = True
            if not stopped:
                text += self.matcher.flush()
        if not text and reason is None:
            return None  # its logprobs, if any, leave with the next text
        entries = self.aligner.release(len(text), final=reason is not None) if self.aligner else ()
        return StreamEvent(text, n, self.prompt_tokens, reason, logprobs=entries)

    def refuse(self) -> StreamEvent:
        """End the sequence where its grammar refused a token (it never should): what it
        has is all it gets."""
        self.done = True
        text = self.matcher.flush() + self.decoder.flush()
        entries = self.aligner.release(len(text), final=True) if self.aligner else ()
        return StreamEvent(text, self.count, self.prompt_tokens, "stop", logprobs=entries)
