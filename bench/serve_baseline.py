"""Bare Ray Serve around vLLM: the floor of any serving path built on Ray Serve.

One Serve deployment, a FastAPI ingress whose replica holds vLLM's AsyncLLM, serving a
streamed ``POST /v1/completions`` behind Serve's HTTP proxy: what a team would write
by hand on Ray Serve, with no accounts, routing or records. ``bench/engine.py`` measures
it against ``vllm serve`` after HAIF: its share of ``vllm serve``'s throughput is what
Ray Serve costs, HAIF's share over it what HAIF's own components cost.

It takes the engine settings and, on CPU, the engine priority of HAIF's worker for the
same model config, and streams with HAIF's piece timing so that the two compare the
path and not the piece size: the first token at once, later tokens gathered into one
chunk at most once every ``stream_batch_ms`` (Ray Serve LLM batches its streams the same
way). HAIF's per-worker piece budget (``stream_pieces_per_s``) has no counterpart here.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from ray import serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ray.serve import Application

APP_NAME = "bare-serve"
ROUTE_PREFIX = "/bare"
DEPLOYMENT = "BareVllm"  # in the replica's process title: how bench.engine finds its CPU

api = FastAPI()


@serve.ingress(api)
class BareVllm:
    def __init__(self, model: Any, model_dir: str, device: str) -> None:
        from haif.runtimes.vllm import start_engine

        # The engine settings and, on CPU, the engine priority of HAIF's worker.
        self.engine = start_engine(model, model_dir, device)
        self.model = model.name
        self.batch_s = model.stream_batch_ms / 1000

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/completions")
    async def completions(self, body: dict[str, Any]) -> StreamingResponse:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not body.get("stream") or not isinstance(body.get("prompt"), str):
            raise HTTPException(400, "this baseline serves streamed completions of one string prompt")
        params = SamplingParams(
            max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            output_kind=RequestOutputKind.DELTA,
        )
        return StreamingResponse(self._sse(body["prompt"], params), media_type="text/event-stream")

    async def _sse(self, prompt: str, params: Any) -> AsyncIterator[str]:
        request_id = uuid.uuid4().hex
        created = int(time.time())
        text, produced, sent_at, finished = "", 0, 0.0, False

        def chunk(payload: dict[str, Any]) -> str:
            return "data: " + json.dumps(
                {"id": request_id, "object": "text_completion", "created": created, "model": self.model, **payload}
            ) + "\n\n"

        try:
            async for out in self.engine.generate(prompt, params, request_id):
                completion = out.outputs[0]
                text += completion.text
                produced += len(completion.token_ids)
                now = time.monotonic()
                if out.finished or (text and now - sent_at >= self.batch_s):
                    finish = completion.finish_reason if out.finished else None
                    yield chunk({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})
                    text, sent_at = "", now
                if out.finished:
                    finished = True
                    prompt_tokens = len(out.prompt_token_ids or ())
                    yield chunk({"choices": [], "usage": {
                        "prompt_tokens": prompt_tokens, "completion_tokens": produced,
                        "total_tokens": prompt_tokens + produced,
                    }})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                await self.engine.abort(request_id)


def build(model: Any, model_dir: str, device: str) -> Application:
    """The app for HAIF's config of the model (``haif.config.ModelConfig``): one replica
    reserving the model's ``num_cpus`` (Ray sets its OMP_NUM_THREADS from it, and vLLM's
    CPU kernels follow it, as for HAIF's worker actor) and its GPU when there is one."""
    options = {"num_cpus": model.num_cpus, **({"num_gpus": 1} if device == "cuda" else {})}
    return serve.deployment(
        BareVllm, name=DEPLOYMENT, max_ongoing_requests=1000, ray_actor_options=options
    ).bind(model, model_dir, device)
