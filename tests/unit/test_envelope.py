"""haif.envelope: ids, limits at the edge, by-reference bodies, deadlines."""

from __future__ import annotations

import time
from typing import Any

import pytest

from haif.config import LimitsConfig
from haif.envelope import (
    Principal,
    RequestContext,
    WorkItem,
    build_work_item,
    check_limits,
    payload_bytes,
    request_id_from,
    traceparent_from,
)
from haif.exceptions import DeadlineExceeded, InvalidRequest, UnprocessableRequest
from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

pytestmark = pytest.mark.unit

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def completion(**kw: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "echo", "prompt": "hello", **kw})


def chat(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


def embedding(**kw: Any) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": "minilm", "input": "hi", **kw})


def ctx(timeout_s: float = 30.0, **kw: Any) -> RequestContext:
    return RequestContext.new(timeout_s=timeout_s, api_key="sk-secret", **kw)


class Recorder:
    """The ``put`` injection point: records what was stored and returns a sentinel."""

    def __init__(self) -> None:
        self.stored: list[Any] = []
        self.ref = object()

    def __call__(self, value: Any) -> Any:
        self.stored.append(value)
        return self.ref


# --- ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["abc", "req-1.2:3_X", "a" * 128])
def test_valid_request_id_is_kept(header: str) -> None:
    assert request_id_from(header) == header


@pytest.mark.parametrize(
    "header", [None, "", "a" * 129, "has space", "semi;colon", "naïve", "a\nb", "abc\n"]
)
def test_invalid_request_id_is_replaced(header: str | None) -> None:
    rid = request_id_from(header)
    assert rid != header
    assert len(rid) == 32 and all(c in "0123456789abcdef" for c in rid)
    assert request_id_from(header) != rid  # fresh each time


def test_traceparent_kept_when_well_formed() -> None:
    assert traceparent_from(TRACEPARENT) == TRACEPARENT
    assert traceparent_from(f"  {TRACEPARENT.upper()} ") == TRACEPARENT


@pytest.mark.parametrize(
    "header",
    [None, "", "garbage", TRACEPARENT[:-1], TRACEPARENT + "0", TRACEPARENT.replace("-", "_"),
     "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01"],
)
def test_traceparent_ignored_when_malformed(header: str | None) -> None:
    assert traceparent_from(header) is None


def test_context_new_normalises_ids() -> None:
    c = ctx(request_id="bad id", traceparent="nope")
    assert c.request_id != "bad id"
    assert c.traceparent is None
    c = ctx(request_id="good-id", traceparent=TRACEPARENT)
    assert c.request_id == "good-id"
    assert c.traceparent == TRACEPARENT


# --- limits ---------------------------------------------------------------------------


def test_default_max_tokens_applied() -> None:
    limits = LimitsConfig(max_tokens=100, default_max_tokens=7)
    assert check_limits(completion(), limits) == 7
    assert check_limits(chat(), limits) == 7
    assert check_limits(completion(max_tokens=100), limits) == 100


def test_max_tokens_over_limit() -> None:
    limits = LimitsConfig(max_tokens=100, default_max_tokens=7)
    with pytest.raises(UnprocessableRequest) as info:
        check_limits(completion(max_tokens=101), limits)
    assert "'max_tokens'" in info.value.message
    assert "101" in info.value.message and "100" in info.value.message
    assert info.value.status_code == 422


def test_chat_prefers_max_completion_tokens() -> None:
    limits = LimitsConfig(max_tokens=100, default_max_tokens=7)
    assert check_limits(chat(max_tokens=50, max_completion_tokens=20), limits) == 20
    assert check_limits(chat(max_tokens=50), limits) == 50
    # The deprecated alias over the limit is ignored when max_completion_tokens is given.
    assert check_limits(chat(max_tokens=500, max_completion_tokens=20), limits) == 20
    with pytest.raises(UnprocessableRequest, match="'max_tokens' is 101"):
        check_limits(chat(max_tokens=1, max_completion_tokens=101), limits)


def test_embedding_inputs_limit() -> None:
    limits = LimitsConfig(max_embedding_inputs=2)
    assert check_limits(embedding(input=["a", "b"]), limits) == 0
    with pytest.raises(UnprocessableRequest, match="'input' has 3 items; the limit is 2"):
        check_limits(embedding(input=["a", "b", "c"]), limits)


def test_stop_count_limit() -> None:
    limits = LimitsConfig(max_stop_sequences=2)
    assert check_limits(completion(stop=["a", "b"]), limits) == limits.default_max_tokens
    assert check_limits(chat(stop="a"), limits) == limits.default_max_tokens
    with pytest.raises(UnprocessableRequest, match="'stop' has 3 sequences"):
        check_limits(completion(stop=["a", "b", "c"]), limits)
    with pytest.raises(UnprocessableRequest, match="'stop'"):
        check_limits(chat(stop=["a", "b", "c"]), limits)


def test_prompts_per_request_limit() -> None:
    limits = LimitsConfig(max_prompts_per_request=2)
    assert check_limits(completion(prompt=["a", "b"]), limits) == limits.default_max_tokens
    with pytest.raises(UnprocessableRequest, match="'prompt' has 3 items; the limit is 2"):
        check_limits(completion(prompt=["a", "b", "c"]), limits)


def test_stream_with_several_prompts_is_invalid() -> None:
    limits = LimitsConfig()
    with pytest.raises(InvalidRequest, match="single prompt") as info:
        check_limits(completion(prompt=["a", "b"], stream=True), limits)
    assert info.value.status_code == 400
    assert check_limits(completion(prompt=["a"], stream=True), limits) == limits.default_max_tokens


# --- work items -----------------------------------------------------------------------


def test_small_body_travels_by_value() -> None:
    put = Recorder()
    body = completion(prompt="x" * 99)
    item = build_work_item("completion", body, ctx(), LimitsConfig(object_ref_threshold_bytes=100), put)
    assert put.stored == []
    assert item.body is body
    assert item.by_reference is False
    assert item.payload_bytes == 99


def test_body_at_threshold_travels_by_reference() -> None:
    put = Recorder()
    body = completion(prompt="x" * 100)
    item = build_work_item("completion", body, ctx(), LimitsConfig(object_ref_threshold_bytes=100), put)
    assert put.stored == [body]
    assert item.body is put.ref
    assert item.by_reference is True


def test_no_put_keeps_the_body() -> None:
    body = completion(prompt="x" * 1000)
    item = build_work_item("completion", body, ctx(), LimitsConfig(object_ref_threshold_bytes=0))
    assert item.body is body


def test_payload_bytes_counts_utf8() -> None:
    assert payload_bytes(completion(prompt="héllo")) == 6
    assert payload_bytes(completion(prompt=["€", "ab"])) == 5
    assert payload_bytes(chat(messages=[{"role": "user", "content": "😀"},
                                        {"role": "assistant", "content": "ok"}])) == 6
    assert payload_bytes(embedding(input=["é", "é"])) == 4


def test_work_item_fields() -> None:
    c = ctx()
    limits = LimitsConfig(max_tokens=100, default_max_tokens=7)
    item = build_work_item(
        "completion", completion(prompt=["a", "b"], max_tokens=9), c, limits, Recorder()
    )
    assert (item.kind, item.model, item.stream, item.max_tokens, item.n_inputs) == (
        "completion", "echo", False, 9, 2
    )
    assert item.ctx is c
    chat_item = build_work_item(
        "chat", chat(stream=True, stream_options={"include_usage": True}), c, limits
    )
    assert chat_item.stream is True and chat_item.include_usage is True
    assert chat_item.n_inputs == 1 and chat_item.max_tokens == 7
    emb = build_work_item("embedding", embedding(input=["a", "b", "c"]), c, limits)
    assert emb.max_tokens == 0 and emb.n_inputs == 3 and emb.include_usage is False


def test_build_work_item_checks_limits_before_storing() -> None:
    put = Recorder()
    with pytest.raises(UnprocessableRequest):
        build_work_item(
            "completion", completion(max_tokens=10_000), ctx(), LimitsConfig(object_ref_threshold_bytes=0), put
        )
    assert put.stored == []


def test_with_ctx_replaces_context() -> None:
    item = build_work_item("completion", completion(), ctx(), LimitsConfig())
    other = ctx()
    assert isinstance(item.with_ctx(other), WorkItem)
    assert item.with_ctx(other).ctx is other


# --- context --------------------------------------------------------------------------


def test_remaining_s_before_deadline() -> None:
    left = ctx(timeout_s=30).remaining_s()
    assert 29 < left <= 30


def test_remaining_s_after_deadline_raises() -> None:
    c = RequestContext(request_id="r1", deadline=time.time() - 0.001)
    with pytest.raises(DeadlineExceeded, match="r1") as info:
        c.remaining_s()
    assert info.value.status_code == 504


def test_authenticated_drops_the_api_key() -> None:
    c = ctx(request_id="r2")
    assert c.api_key == "sk-secret"
    principal = Principal(tenant="acme")
    auth = c.authenticated(principal)
    assert auth.api_key is None
    assert auth.principal is principal
    assert (auth.request_id, auth.deadline) == (c.request_id, c.deadline)
    assert c.api_key == "sk-secret"  # the original is unchanged (frozen)
    assert "sk-secret" not in repr(c)
