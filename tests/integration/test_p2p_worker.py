"""The reference remote P2P worker (`haif p2p worker`), outside Ray, behind a real sidecar on a
local testnet, called the way the P2P shim calls it: health, a unary generation, a stream
whose events join to it, an embedding, and its refusals (another model, a peer it was not
told to serve, a malformed work item)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from haif.config import HaifConfig, P2PConfig
from haif.envelope import RequestContext, build_work_item
from haif.exceptions import AuthenticationFailed, InvalidRequest, ModelNotFound
from haif.p2p import WORKER_METHODS, Sidecar
from haif.p2p.wire import decode_embedding, decode_event, decode_outputs, encode_item
from haif.p2p.worker import RemoteWorker
from haif.protocol import CompletionRequest, EmbeddingRequest
from tests.support.p2p import LoopThread, Testnet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def net() -> Iterator[tuple[LoopThread, Sidecar, Sidecar, HaifConfig]]:
    import ray

    ray_before = ray.is_initialized()
    with Testnet() as testnet, LoopThread() as loop:
        settings = P2PConfig(enabled=True, bootstrap=testnet.bootstrap, request_timeout_s=10)
        config = HaifConfig.model_validate({
            "p2p": settings.model_dump(),
            "models": [{"name": "echo", "runtime": "echo", "device": "cpu"}],
        })
        tmp = Path(__import__("tempfile").mkdtemp())
        caller = Sidecar(settings, seed_file=tmp / "caller", runtime_dir=tmp / "c", handler=_no_inbound)
        loop.run(caller.start())
        assert loop.run(caller.wait_up(20))
        worker = RemoteWorker(config, "echo", allow=frozenset({caller.public_key}))
        loop.run(worker.load())
        assert ray.is_initialized() == ray_before, "a remote worker starts no Ray of its own"
        served = Sidecar(settings, seed_file=tmp / "worker", runtime_dir=tmp / "w", handler=worker,
                         methods=WORKER_METHODS)
        loop.run(served.start())
        assert loop.run(served.wait_up(20))
        yield loop, caller, served, config
        loop.run(served.stop())
        loop.run(caller.stop())


async def _no_inbound(method: str, peer: str, value: dict) -> None:
    raise AssertionError("the caller serves nothing")


def _item(config: HaifConfig, body: object, kind: str = "completion"):  # noqa: ANN202
    return build_work_item(kind, body, RequestContext.new(timeout_s=10, api_key=None), config.limits)  # type: ignore[arg-type]


def test_health_and_a_generation(net: tuple) -> None:
    loop, caller, worker, config = net
    health = loop.run(caller.call(worker.public_key, "haif.worker.health", {}, timeout_s=10))
    assert health == {"state": "ready", "in_flight": 0, "model": "echo", "adapters": []}
    body = CompletionRequest(model="echo", prompt="a b c d", max_tokens=3)
    answer = loop.run(caller.call(worker.public_key, "haif.worker.infer", encode_item(_item(config, body), body),
                                  timeout_s=10))
    (output,) = decode_outputs(answer)
    assert (output.text, output.completion_tokens, output.finish_reason) == ("a b c ", 3, "length")


def test_a_stream_joins_to_the_same_answer(net: tuple) -> None:
    loop, caller, worker, config = net
    body = CompletionRequest(model="echo", prompt="one two three", max_tokens=8, stream=True)
    value = {**encode_item(_item(config, body), body), "haif": {"request_id": "w-stream-1"}}

    async def collect() -> list:
        return [c async for c in caller.stream(worker.public_key, "haif.worker.infer", value, timeout_s=10)]

    *chunks, _end = loop.run(collect())
    events = [decode_event(c) for c in chunks]
    assert "".join(e.text for e in events) == "one two three"
    assert events[-1].finish_reason == "stop"


def test_an_embedding(net: tuple) -> None:
    loop, caller, worker, config = net
    body = EmbeddingRequest(model="echo", input=["hello", "world"])
    answer = loop.run(caller.call(worker.public_key, "haif.worker.infer",
                                  encode_item(_item(config, body, "embedding"), body), timeout_s=10))
    result = decode_embedding(answer)
    assert result.vectors.shape == (2, 8) and result.prompt_tokens == 2


def test_refusals_are_typed(net: tuple, tmp_path: Path) -> None:
    loop, caller, worker, config = net
    other = CompletionRequest(model="tiny-llama", prompt="x")
    item = encode_item(_item(config, other), other)
    with pytest.raises(ModelNotFound):
        loop.run(caller.call(worker.public_key, "haif.worker.infer", item, timeout_s=10))
    with pytest.raises(InvalidRequest, match="not a work item"):
        loop.run(caller.call(worker.public_key, "haif.worker.infer", {"kind": "chat"}, timeout_s=10))
    # A peer the worker was not told to serve.
    stranger = Sidecar(config.p2p, seed_file=tmp_path / "s", runtime_dir=tmp_path / "r", handler=_no_inbound)
    loop.run(stranger.start())
    try:
        assert loop.run(stranger.wait_up(20))
        with pytest.raises(AuthenticationFailed):
            loop.run(stranger.call(worker.public_key, "haif.worker.health", {}, timeout_s=10))
    finally:
        loop.run(stranger.stop())
