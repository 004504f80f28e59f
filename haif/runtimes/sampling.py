"""The torch runtime's logits processors and sampler, batched, each row with its own parameters.

One ``BatchSampler`` serves one running batch. Each step it takes the model's last logits
(one row per sequence) and, per row, as vLLM orders them:

1. ``logit_bias``: added to the named tokens;
2. ``min_tokens``: the stop tokens (EOS, ``stop_token_ids``) masked until that many were made;
3. ``repetition_penalty`` (prompt and output tokens), then ``frequency_penalty`` and
   ``presence_penalty`` (output tokens);
4. the grammar of a guided row (``haif.runtimes.grammar``): tokens it does not allow masked;
5. sampling: argmax for greedy rows; temperature, ``top_k``, ``top_p`` and ``min_p`` for the
   others, with each row's own seeded generator.

A processor's tensors exist only when some row of the batch uses it, and a row that does
not use it is left exactly as it was (a bias of 0, a penalty of 1 change no bit), so each
request of a mixed batch gets what it asked for and nothing else. Logprobs are those of the
model's raw distribution, before any processor (vLLM's default).

torch is imported only when a batch runs (the runtime imports this module lazily).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from haif.runtimes.base import SamplingParams
    from haif.runtimes.grammar import Matcher


@dataclass(eq=False)
class RowState:
    """What sampling remembers of one sequence: its parameters, generator, output, grammar."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    stop_ids: frozenset[int]  # the tokens min_tokens holds back: EOS and stop_token_ids
    matcher: Matcher | None = None
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.params.greedy and self.generator is None:
            self.generator = torch.Generator()
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed)


@dataclass(frozen=True)
class Logprobs:
    """A row's chosen token's log probability and its most likely alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class BatchSampler:
    """Processors and sampler of one batch (see the module docstring); rows in batch order."""

    def __init__(
        self, rows: list[RowState], vocab_size: int, device: torch.device,
        mask: object | None = None,
    ) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = device
        self._mask = mask  # a grammar.BatchMask when some row is guided
        n = len(rows)
        params = [r.params for r in rows]
        self._bias: torch.Tensor | None = None
        if any(p.logit_bias for p in params):
            self._bias = torch.zeros((n, vocab_size), dtype=torch.float32)
            for i, p in enumerate(params):
                for token, bias in p.logit_bias:
                    self._bias[i, token] = bias
            self._bias = self._bias.to(device)
        # Penalties touch only the tokens a row has seen: they are gathered, changed and
        # scattered back (a handful per row, whatever the vocabulary's size). Every row of a
        # batch makes one token a step, so the outputs are a (rows, steps) tensor.
        self._outputs: torch.Tensor | None = None
        self._steps = 0
        self._counts: torch.Tensor | None = None  # output tokens made, per row and token
        self._prompts: torch.Tensor | None = None  # prompt ids, padded with each row's first
        penalized = [p for p in params if p.penalized]
        if penalized:
            longest = max(p.max_tokens for p in params)
            self._outputs = torch.zeros((n, longest), dtype=torch.long, device=device)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self._counts = torch.zeros((n, vocab_size), dtype=torch.float32, device=device)
            self._presence = self._column([p.presence_penalty for p in params])
            self._frequency = self._column([p.frequency_penalty for p in params])
        if any(p.repetition_penalty != 1.0 for p in params):
            width = max(len(r.prompt_ids) for r in rows)
            padded = [list(r.prompt_ids) + [r.prompt_ids[0]] * (width - len(r.prompt_ids)) for r in rows]
            self._prompts = torch.tensor(padded, dtype=torch.long, device=device)
            self._repetition = self._column([p.repetition_penalty for p in params])

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(1)

    # --- each step -------------------------------------------------------------------------

    def logprobs(self, raw: torch.Tensor, tokens: Sequence[int]) -> list[Logprobs | None]:
        """Per row that asked: the chosen token's log probability under the model's raw
        distribution, and the ``logprobs`` most likely tokens."""
        wanted = [i for i, r in enumerate(self.rows) if r.params.logprobs is not None]
        out: list[Logprobs | None] = [None] * len(self.rows)
        if not wanted:
            return out
        index = torch.tensor(wanted, device=raw.device)
        logp = torch.log_softmax(raw.index_select(0, index).float(), dim=-1)
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=raw.device))
        k = max(self.rows[i].params.logprobs or 0 for i in wanted)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (None, None)
        for j, i in enumerate(wanted):
            count = self.rows[i].params.logprobs or 0
            top: tuple[tuple[int, float], ...] = ()
            if count and top_ids is not None and top_values is not None:
                top = tuple(zip(top_ids[j, :count].tolist(), top_values[j, :count].tolist(), strict=True))
            out[i] = Logprobs(float(chosen[j, 0]), top)
        return out

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply every row's processors to ``logits`` (float32, changed in place)."""
        if self._bias is not None:
            logits += self._bias
        held = [(i, r) for i, r in enumerate(self.rows) if len(r.output) < r.params.min_tokens]
        for i, row in held:
            if row.matcher is None and row.stop_ids:  # a grammar decides its own end
                logits[i, list(row.stop_ids)] = float("-inf")
        outputs = self._outputs[:, : self._steps] if self._outputs is not None else None
        if self._prompts is not None:
            seen = torch.cat([self._prompts, outputs], dim=1) if outputs is not None else self._prompts
            values = logits.gather(1, seen)  # a token seen twice gets the same value twice
            values = torch.where(values > 0, values / self._repetition, values * self._repetition)
            logits.scatter_(1, seen, values)
        if self._counts is not None and outputs is not None and self._steps:
            counts = self._counts.gather(1, outputs)
            values = logits.gather(1, outputs) - (self._frequency * counts + self._presence * (counts > 0))
            logits.scatter_(1, outputs, values)
        if self._mask is not None:
            guided = ((i, r.matcher) for i, r in enumerate(self.rows) if r.matcher is not None)
            self._mask.apply(logits, guided)  # type: ignore[attr-defined]
        return logits

    def sample(self, logits: torch.Tensor) -> list[int]:
        """Next token per row: argmax for greedy rows; temperature, top-k, top-p and min-p
        for the others, drawn with each row's own generator."""
        tokens = logits.argmax(dim=-1).tolist()
        picked = [i for i, row in enumerate(self.rows) if row.generator is not None]
        if not picked:
            return tokens
        device = logits.device
        sub = logits.index_select(0, torch.tensor(picked, device=device)).float()
        params = [self.rows[i].params for i in picked]
        temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
        probs, order = torch.softmax(sub / temps, dim=-1).sort(dim=-1, descending=True)
        keep = (probs.cumsum(dim=-1) - probs) < top_p  # always keeps the most likely token
        if any(p.top_k > 0 for p in params):
            k = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[1] for p in params], device=device)
            keep &= torch.arange(probs.shape[1], device=device).unsqueeze(0) < k.unsqueeze(1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
            keep &= probs >= min_p * probs[:, :1]
        cumulative = (probs * keep).cumsum(dim=-1)
        # Uniforms come from each row's own CPU generator: a seeded row draws the same
        # numbers whatever else is in its batch and on whichever device.
        draws = torch.cat([torch.rand(1, generator=self.rows[i].generator) for i in picked]).to(device)
        targets = (draws * cumulative[:, -1]).unsqueeze(1)
        index = torch.searchsorted(cumulative, targets, right=True)
        index = torch.minimum(index, keep.sum(dim=-1, keepdim=True) - 1)
        for i, token in zip(picked, order.gather(1, index).squeeze(1).tolist(), strict=True):
            tokens[i] = token
        return tokens

    def accept(self, tokens: Sequence[int]) -> list[bool]:
        """Record each row's new token; per row, whether its grammar took it (True unguided)."""
        accepted: list[bool] = []
        for row, token in zip(self.rows, tokens, strict=True):
            row.output.append(token)
            accepted.append(row.matcher.accept(token) if row.matcher is not None else True)
        if self._outputs is not None:  # one update for the batch
            index = torch.tensor(list(tokens), device=self.device)
            self._outputs[:, self._steps] = index
            self._steps += 1
            if self._counts is not None:
                self._counts[torch.arange(len(self.rows), device=self.device), index] += 1
        return accepted

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (finished and cancelled ones leave the batch)."""
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        if self._bias is not None:
            self._bias = self._bias.index_select(0, index)
        if self._outputs is not None:
            self._outputs = self._outputs.index_select(0, index)
        if self._counts is not None:
            self._counts = self._counts.index_select(0, index)
            self._presence = self._presence.index_select(0, index)
            self._frequency = self._frequency.index_select(0, index)
        if self._prompts is not None:
            self._prompts = self._prompts.index_select(0, index)
            self._repetition = self._repetition.index_select(0, index)
