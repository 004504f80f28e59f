"""The torch runtime's logits processors, each applied to exactly the rows that ask for it:
first on a batch of made-up logits, then through the runtime on tiny-llama, in mixed batches."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from haif.exceptions import InvalidRequest
from haif.runtimes.base import SamplingParams
from haif.runtimes.hf import _byte_level_decoder
from haif.runtimes.sampling import BatchSampler, RowState
from haif.runtimes.torch import TorchRuntime
from tests.support import tiny
from tests.support.aio import run_sync

pytestmark = pytest.mark.unit

VOCAB = 12
CPU = torch.device("cpu")


def row(prompt: tuple[int, ...] = (1, 2), **kw: Any) -> RowState:
    params = SamplingParams(max_tokens=8, temperature=kw.pop("temperature", 0.0), **kw)
    return RowState(params, prompt, stop_ids=frozenset({0, *params.stop_token_ids}))


def sampler(*rows: RowState) -> BatchSampler:
    return BatchSampler(list(rows), VOCAB, CPU)


def logits(n: int) -> torch.Tensor:
    """Distinct logits per row, positive and negative, the same for every row."""
    base = torch.linspace(-3.0, 3.0, VOCAB)
    return base.repeat(n, 1)


def unchanged(before: torch.Tensor, after: torch.Tensor, rows: list[int]) -> bool:
    return all(torch.equal(before[i], after[i]) for i in rows)


# --- each processor on its own row ------------------------------------------------------------


def test_presence_penalty_only_on_the_row_that_asked() -> None:
    s = sampler(row(), row(presence_penalty=1.5), row())
    s.accept([3, 3, 3])
    s.accept([3, 5, 3])
    before = logits(3)
    after = s.process(before.clone())
    assert unchanged(before, after, [0, 2])
    delta = after[1] - before[1]
    assert delta[3].item() == pytest.approx(-1.5) and delta[5].item() == pytest.approx(-1.5)
    assert torch.count_nonzero(delta) == 2  # once per token present, however often


def test_frequency_penalty_counts_each_occurrence() -> None:
    s = sampler(row(frequency_penalty=0.5), row())
    for tokens in ([4, 4], [4, 6], [7, 6]):
        s.accept(tokens)
    before = logits(2)
    after = s.process(before.clone())
    assert unchanged(before, after, [1])
    delta = after[0] - before[0]
    assert delta[4].item() == pytest.approx(-1.0)  # twice
    assert delta[7].item() == pytest.approx(-0.5)
    assert torch.count_nonzero(delta) == 2


def test_negative_presence_penalty_encourages_repeats() -> None:
    s = sampler(row(presence_penalty=-2.0))
    s.accept([9])
    before = logits(1)
    assert (s.process(before.clone()) - before)[0, 9].item() == pytest.approx(2.0)


def test_repetition_penalty_covers_the_prompt_and_output_of_its_row() -> None:
    s = sampler(row(prompt=(1, 10), repetition_penalty=2.0), row(prompt=(1, 10)))
    s.accept([11, 11])
    before = logits(2)
    after = s.process(before.clone())
    assert unchanged(before, after, [1])
    for token in (1, 10, 11):  # negative logits are multiplied, positive ones divided
        value = before[0, token].item()
        expected = value / 2.0 if value > 0 else value * 2.0
        assert after[0, token].item() == pytest.approx(expected)
    others = [t for t in range(VOCAB) if t not in (1, 10, 11)]
    assert torch.equal(after[0, others], before[0, others])


def test_logit_bias_only_on_its_row_and_tokens() -> None:
    s = sampler(row(), row(logit_bias=((2, 100.0), (7, -100.0))), row())
    before = logits(3)
    after = s.process(before.clone())
    assert unchanged(before, after, [0, 2])
    assert after[1, 2].item() == pytest.approx(before[1, 2].item() + 100)
    assert after[1, 7].item() == pytest.approx(before[1, 7].item() - 100)
    assert s.sample(after) == [VOCAB - 1, 2, VOCAB - 1]  # greedy: the bias decides row 1 alone


def test_min_tokens_holds_back_the_stop_tokens_of_its_row() -> None:
    s = sampler(row(min_tokens=2, stop_token_ids=(5,)), row())
    before = logits(2)
    after = s.process(before.clone())
    assert after[0, 0].item() == float("-inf") and after[0, 5].item() == float("-inf")
    assert unchanged(before, after, [1])
    s.accept([3, 3])
    s.accept([3, 3])  # two tokens made: stop tokens are allowed again
    assert torch.equal(s.process(before.clone()), before)


def test_top_k_and_min_p_limit_a_sampled_row_to_the_most_likely() -> None:
    # Sampled rows, each with its own generator: with top_k=1 (or min_p=1) only the argmax
    # remains; an unlimited row at a high temperature ranges over the vocabulary.
    rows = [row(temperature=2.0, top_k=1, seed=s) for s in range(20)]
    rows += [row(temperature=2.0, min_p=1.0, seed=s) for s in range(20)]
    rows += [row(temperature=2.0, seed=s) for s in range(20)]
    s = sampler(*rows)
    tokens = s.sample(s.process(logits(len(rows))))
    assert set(tokens[:40]) == {VOCAB - 1}
    assert len(set(tokens[40:])) > 3


def test_logprobs_are_the_raw_distribution_with_each_rows_alternatives() -> None:
    s = sampler(row(logprobs=3), row(), row(logprobs=0))
    raw = logits(3)
    out = s.logprobs(raw, [VOCAB - 1, 0, 4])
    expected = torch.log_softmax(raw[0], dim=-1)
    assert out[0] is not None and out[0].logprob == pytest.approx(expected[VOCAB - 1].item())
    assert [t for t, _ in out[0].top] == [VOCAB - 1, VOCAB - 2, VOCAB - 3]
    assert out[1] is None
    assert out[2] is not None and out[2].top == () and out[2].logprob == pytest.approx(expected[4].item())


def test_rows_keep_their_state_when_others_leave_the_batch() -> None:
    s = sampler(row(), row(presence_penalty=1.0, logit_bias=((1, 5.0),)), row(frequency_penalty=1.0))
    s.accept([3, 4, 5])
    s.select([1, 2])  # the first row finished
    before = logits(2)
    delta = s.process(before.clone()) - before
    assert delta[0, 4].item() == pytest.approx(-1.0) and delta[0, 1].item() == pytest.approx(5.0)
    assert delta[1, 5].item() == pytest.approx(-1.0)
    assert torch.count_nonzero(delta) == 3


def test_a_batch_without_processors_builds_none() -> None:
    s = sampler(row(), row())
    before = logits(2)
    assert torch.equal(s.process(before.clone()), before)
    assert s._bias is None and s._counts is None and s._prompts is None and s._outputs is None


# --- through the runtime, in mixed batches ------------------------------------------------------


PROMPT = "The teacher"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchRuntime]:
    rt = tiny.runtime(tiny.model_dir(tmp_path_factory), torch={"max_batch_size": 16, "max_wait_ms": 30})
    yield rt
    run_sync(rt.unload())


async def together(rt: TorchRuntime, *params: SamplingParams) -> list[str]:
    async def run() -> list[str]:
        return [o.text for o in await asyncio.gather(*(rt.generate(PROMPT, p) for p in params))]

    return await run()


async def alone(rt: TorchRuntime, params: SamplingParams) -> str:
    return (await rt.generate(PROMPT, params)).text


@pytest.mark.parametrize(
    "asked",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"repetition_penalty": 1.8},
        {"logit_bias": ((300, 100.0),)},
        {"min_tokens": 24, "ignore_eos": False},
    ],
    ids=["presence", "frequency", "repetition", "logit_bias", "min_tokens"],
)
async def test_a_processor_changes_only_the_request_that_asked(runtime: TorchRuntime, asked: dict[str, Any]) -> None:
    plain = tiny.greedy(24)
    asking = tiny.greedy(24, **asked)
    solo_plain, solo_asking = await alone(runtime, plain), await alone(runtime, asking)
    batch = await together(runtime, plain, asking, plain)
    assert batch == [solo_plain, solo_asking, solo_plain]
    if "min_tokens" not in asked:  # min_tokens changes nothing that does not stop early
        assert solo_asking != solo_plain


async def test_penalties_change_a_seeded_sample(runtime: TorchRuntime) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=11)
    penalized = SamplingParams(max_tokens=24, temperature=1.0, seed=11, presence_penalty=2.0,
                               frequency_penalty=1.0)
    assert await alone(runtime, seeded) == await alone(runtime, seeded)
    assert await alone(runtime, penalized) == await alone(runtime, penalized)
    assert await alone(runtime, penalized) != await alone(runtime, seeded)


async def test_a_logit_bias_of_100_decides_every_token(runtime: TorchRuntime) -> None:
    token = runtime._tokenizer.convert_tokens_to_ids("ed")
    out = await runtime.generate(PROMPT, SamplingParams(max_tokens=6, seed=3, logit_bias=((token, 100.0),)))
    assert out.text == "ed" * 6


async def test_min_tokens_holds_eos_back(runtime: TorchRuntime) -> None:
    eos = runtime._tokenizer.eos_token_id
    ends = tiny.greedy(10, logit_bias=((eos, 100.0),))
    assert (await runtime.generate(PROMPT, ends)).completion_tokens == 1
    held = tiny.greedy(10, logit_bias=((eos, 100.0),), min_tokens=4)
    out = await runtime.generate(PROMPT, held)
    assert (out.completion_tokens, out.finish_reason) == (5, "stop")  # four, then EOS


async def test_stop_token_ids_and_ignore_eos(runtime: TorchRuntime) -> None:
    plain = await runtime.generate(PROMPT, tiny.greedy(8, logprobs=0))
    chars = {b: c for c, b in _byte_level_decoder().items()}
    tokenizer = runtime._tokenizer
    ids = [tokenizer.convert_tokens_to_ids("".join(chars[b] for b in e.raw)) for e in plain.logprobs]
    at = next(i for i, t in enumerate(ids) if t != ids[0])  # the first token unlike the first
    stopped = await runtime.generate(PROMPT, tiny.greedy(8, stop_token_ids=(ids[at],)))
    assert (stopped.finish_reason, stopped.completion_tokens) == ("stop", at + 1)
    assert plain.text.startswith(stopped.text) and stopped.text  # the stop token shows no text
    eos = runtime._tokenizer.eos_token_id
    forced = tiny.greedy(8, logit_bias=((eos, 100.0),), ignore_eos=True)
    out = await runtime.generate(PROMPT, forced)
    assert (out.completion_tokens, out.finish_reason, out.text) == (8, "length", "")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (tiny.greedy(4, logit_bias=((99_999, 1.0),)), "logit_bias: token id 99999"),
        (tiny.greedy(4, stop_token_ids=(50_000,)), "stop_token_ids: token id 50000"),
    ],
)
async def test_token_ids_outside_the_vocabulary_are_a_400(runtime: TorchRuntime, params: SamplingParams, named: str) -> None:
    with pytest.raises(InvalidRequest, match=named):
        await runtime.generate(PROMPT, params)

