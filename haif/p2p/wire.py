"""Work items and their results as JSON, for remote P2P workers (``haif.worker.infer``).

The value of ``haif.worker.infer`` is a work item's envelope::

    {"kind": "completion" | "chat" | "embedding", "model", "stream", "max_tokens",
     "n_inputs", "payload_bytes", "include_usage", "n_choices",
     "body": <the HTTP API's request body>,
     "ctx": {"request_id", "timeout_s", "traceparent"}}

(the deadline travels as the seconds left, so that the peer's clock does not matter).
Its answer is the worker's result: ``{"outputs": [GenerationOutput...]}`` for a
generation, ``{"model", "vectors": [[float]], "prompt_tokens"}`` for embeddings; a
stream's chunks are its events (``StreamEvent`` fields), the answer ``{}``. Logprobs, when
asked, are ``[{"token", "logprob", "bytes": [int], "top": [[token, logprob, [int]]]}]``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from haif.envelope import EmbeddingResult, RequestContext, WorkItem
from haif.exceptions import InvalidRequest
from haif.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from haif.runtimes.base import GenerationOutput, StreamEvent, TokenLogprob, TopToken

if TYPE_CHECKING:
    import numpy as np

_BODIES: dict[str, type[Any]] = {
    "completion": CompletionRequest,
    "chat": ChatCompletionRequest,
    "embedding": EmbeddingRequest,
}


def encode_item(item: WorkItem, body: Any) -> dict[str, Any]:
    """``item`` for the wire; ``body`` is its request body (resolved if it was a reference)."""
    ctx = item.ctx
    return {
        "kind": item.kind,
        "model": item.base,  # the model the peer runs (adapters do not travel)
        "stream": item.stream,
        "max_tokens": item.max_tokens,
        "n_inputs": item.n_inputs,
        "payload_bytes": item.payload_bytes,
        "include_usage": item.include_usage,
        "n_choices": item.n_choices,
        "body": body.model_dump(mode="json", exclude_unset=True),
        "ctx": {"request_id": ctx.request_id, "timeout_s": ctx.remaining_s(), "traceparent": ctx.traceparent},
    }


def decode_item(value: dict[str, Any]) -> WorkItem:
    """The work item a peer sent; InvalidRequest when it is not one."""
    try:
        kind = value["kind"]
        body = _BODIES[kind].model_validate(value["body"])
        ctx = value["ctx"]
        timeout_s = float(ctx["timeout_s"])
        if not timeout_s > 0:
            raise ValueError("no time left")
        return WorkItem(
            kind=kind,
            model=str(value["model"]),
            stream=bool(value["stream"]),
            max_tokens=int(value["max_tokens"]),
            n_inputs=int(value["n_inputs"]),
            payload_bytes=int(value["payload_bytes"]),
            body=body,
            ctx=RequestContext.new(
                timeout_s=timeout_s, api_key=None, request_id=ctx.get("request_id"),
                traceparent=ctx.get("traceparent"),
            ),
            include_usage=bool(value.get("include_usage", False)),
            n_choices=int(value.get("n_choices", 1)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(f"not a work item: {type(exc).__name__}: {str(exc)[:200]}") from None


def _encode_logprobs(entries: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    return [
        {"token": e.token, "logprob": e.logprob, "bytes": list(e.raw),
         "top": [[t.token, t.logprob, list(t.raw)] for t in e.top]}
        for e in entries
    ]


def _decode_logprobs(value: Any) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            str(e["token"]), None if e["logprob"] is None else float(e["logprob"]), bytes(e["bytes"]),
            tuple(TopToken(str(t), float(lp), bytes(raw)) for t, lp, raw in e.get("top", ())),
        )
        for e in value or ()
    )


def _fields(result: GenerationOutput | StreamEvent) -> dict[str, Any]:
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    fields["logprobs"] = _encode_logprobs(result.logprobs)
    return fields


def encode_outputs(outputs: list[GenerationOutput]) -> dict[str, Any]:
    return {"outputs": [_fields(o) for o in outputs]}


def decode_outputs(value: dict[str, Any]) -> list[GenerationOutput]:
    return [GenerationOutput(**{**o, "logprobs": _decode_logprobs(o.get("logprobs"))}) for o in value["outputs"]]


def encode_event(event: StreamEvent) -> dict[str, Any]:
    return _fields(event)


def decode_event(value: dict[str, Any]) -> StreamEvent:
    return StreamEvent(**{**value, "logprobs": _decode_logprobs(value.get("logprobs"))})


def encode_embedding(result: EmbeddingResult, vectors: np.ndarray) -> dict[str, Any]:
    return {"model": result.model, "vectors": vectors.tolist(), "prompt_tokens": result.prompt_tokens}


def decode_embedding(value: dict[str, Any]) -> EmbeddingResult:
    import numpy as np

    return EmbeddingResult(
        model=value["model"], vectors=np.asarray(value["vectors"], dtype=np.float32),
        prompt_tokens=int(value["prompt_tokens"]),
    )
