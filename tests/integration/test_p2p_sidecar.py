"""The P2P sidecar, started and supervised from Python, against peers that use the real
@hyperswarm/rpc on a local testnet (127.0.0.1): requests, streams, typed errors, bad
input, outbound calls, and a SIGKILL the supervisor recovers from with the same key."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from haif.config import P2PConfig
from haif.exceptions import (
    AuthenticationFailed,
    DeadlineExceeded,
    ModelNotFound,
    Overloaded,
    WorkerUnavailable,
)
from haif.p2p import WORKER_METHODS, Sidecar, SidecarState
from haif.p2p.keys import load_or_create_seed, public_key, public_key_hex
from tests.support.p2p import LoopThread, Testnet, node_public_key, run_peer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 64 * 1024
CANCELLED: list[str] = []  # requests whose handler was cancelled (deadline passed)


def _reply(value: dict[str, Any]) -> str:
    return "echo: " + value["messages"][-1]["content"]


async def echo_haif(method: str, peer: str, value: dict[str, Any]) -> Any:
    """A stand-in for the Gateway: OpenAI-shaped answers that echo the request."""
    if value.get("model") == "missing":
        raise ModelNotFound("model 'missing' does not exist")
    if value.get("model") == "locked":
        raise AuthenticationFailed("this peer's key is not mapped to a tenant")
    if value.get("model") == "buggy":
        raise KeyError("a bug")
    if value.get("model") == "slow":
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            CANCELLED.append(value["haif"]["request_id"])
            raise
    if method == "haif.models":
        return {"object": "list", "data": [{"id": "echo", "object": "model"}], "peer": peer}
    if method == "haif.chat" and value.get("stream"):
        return _chat_chunks(_reply(value))
    if method == "haif.chat":
        return {
            "object": "chat.completion",
            "model": value["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _reply(value)}, "finish_reason": "stop"}],
        }
    return {"method": method, "value": value}


async def _chat_chunks(text: str) -> AsyncIterator[dict[str, Any]]:
    for word in text.split(" "):
        yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word + " "}}]}


async def worker(method: str, peer: str, value: dict[str, Any]) -> Any:
    """A remote P2P worker: health, and an inference that streams when asked."""
    if method == "haif.worker.health":
        return {"ok": True}
    if value.get("overload"):
        raise Overloaded("queue full", retry_after_s=3)
    if value.get("stream"):
        return _tokens(value["prompt"])
    return {"text": value["prompt"].upper()}


async def _tokens(prompt: str) -> AsyncIterator[str]:
    for ch in prompt:
        yield ch.upper()


def _settings(bootstrap: list[str], **extra: Any) -> P2PConfig:
    return P2PConfig(
        enabled=True, bootstrap=bootstrap, max_message_bytes=MAX_MESSAGE_BYTES,
        request_timeout_s=10, restart_backoff_initial_s=0.1, **extra,
    )


def _start(loop: LoopThread, tmp: Path, settings: P2PConfig, handler: Any, **kwargs: Any) -> Sidecar:
    sidecar = Sidecar(settings, seed_file=tmp / "seed", runtime_dir=tmp / "run", handler=handler, **kwargs)
    loop.run(sidecar.start())
    assert loop.run(sidecar.wait_up(20)), sidecar.status()
    return sidecar


@pytest.fixture(scope="module")
def testnet() -> Iterator[Testnet]:
    with Testnet() as net:
        yield net


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    with LoopThread() as thread:
        yield thread


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shim")


@pytest.fixture(scope="module")
def shim(loop: LoopThread, testnet: Testnet, shim_dir: Path) -> Iterator[Sidecar]:
    sidecar = _start(loop, shim_dir, _settings(testnet.bootstrap), echo_haif)
    yield sidecar
    loop.run(sidecar.stop())


def test_the_public_key_python_computes_is_the_one_hyperdht_derives(
    shim: Sidecar, shim_dir: Path, tmp_path: Path
) -> None:
    for _ in range(3):
        seed = secrets.token_bytes(32)
        assert public_key(seed).hex() == node_public_key(seed)
    # the key the running sidecar listens as is the one Python computed without Node
    status = shim.status()
    assert status.listening_key == status.public_key == public_key_hex(shim_dir / "seed")
    assert status.public_key == node_public_key(load_or_create_seed(shim_dir / "seed"))
    # created once, then read back the same
    assert public_key_hex(tmp_path / "s") == public_key_hex(tmp_path / "s")
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o600


def test_a_peer_lists_models_and_chats_plain_and_streamed(shim: Sidecar, testnet: Testnet) -> None:
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hello there peer"}]}
    seed = secrets.token_bytes(32)
    report = run_peer(testnet.bootstrap, shim.public_key, [
        {"method": "haif.models", "value": {}},
        {"method": "haif.chat", "value": chat},
        {"method": "haif.chat", "value": {**chat, "stream": True, "haif": {"request_id": "r-1"}}},
    ], seed=seed)
    models, plain, streamed = report["results"]
    assert models["value"]["data"] == [{"id": "echo", "object": "model"}]
    assert models["value"]["peer"] == report["public_key"] == public_key(seed).hex()
    content = plain["value"]["choices"][0]["message"]["content"]
    assert content == "echo: hello there peer"
    assert streamed["value"] == {"object": "haif.stream.end", "id": "r-1", "chunks": 4}
    joined = "".join(c["choices"][0]["delta"]["content"] for c in streamed["chunks"])
    assert joined.strip() == content
    assert wait_for(lambda: shim.status().inbound_peers == 0, what="the peer to disconnect") is True


def _cause(result: dict[str, Any]) -> dict[str, Any]:
    assert result["error"]["code"] == "REQUEST_ERROR", result
    return result["error"]["cause"]


def test_errors_are_typed_and_bad_input_leaves_the_sidecar_serving(shim: Sidecar, testnet: Testnet) -> None:
    pid = shim.pid
    ok = {"method": "haif.models", "value": {}}
    results = run_peer(testnet.bootstrap, shim.public_key, [
        {"method": "haif.chat", "value": {"model": "missing", "messages": []}},
        {"method": "haif.chat", "value": {"model": "locked", "messages": []}},
        {"method": "haif.chat", "value": {"model": "buggy", "messages": []}},
        {"method": "haif.chat", "value": {"model": "slow", "haif": {"request_id": "slow-1", "timeout_s": 0.3}}},
        {"method": "haif.nope", "value": {}},
        {"method": "haif.chat", "raw_hex": "057b6f6f7073"},  # "{oops": not JSON
        {"method": "haif.chat", "raw_hex": "ffffffff"},  # a length past the end
        {"method": "haif.chat", "value": [1, 2]},  # JSON, not an object
        {"method": "haif.chat", "value": {"pad": "x" * MAX_MESSAGE_BYTES}},  # oversize
        ok,
    ])["results"]
    missing, locked, buggy, slow, unknown, *bad, last = results
    assert _cause(missing)["code"] == "MODEL_NOT_FOUND"
    assert _cause(missing)["message"] == "model 'missing' does not exist"
    assert json.loads(_cause(missing)["context"]) == {
        "type": "invalid_request_error", "code": "model_not_found", "status": 404,
    }
    assert _cause(locked)["code"] == "UNAUTHORIZED"
    assert _cause(buggy) | {"context": None} == {"code": "INTERNAL", "message": "internal error", "context": None}
    assert _cause(slow)["code"] == "TIMEOUT"
    assert wait_for(lambda: CANCELLED == ["slow-1"], what="the handler to be cancelled")
    assert unknown["error"] == {"code": "UNKNOWN_METHOD", "message": "UNKNOWN_METHOD: Unknown method 'haif.nope'", "cause": None}
    assert [_cause(r)["code"] for r in bad] == ["INVALID_REQUEST"] * 4
    assert "p2p.max_message_bytes" in _cause(bad[-1])["message"]
    assert last["value"]["object"] == "list"
    assert shim.pid == pid and shim.state is SidecarState.UP


def test_outbound_calls_reach_a_remote_worker(loop: LoopThread, shim: Sidecar, testnet: Testnet, tmp_path: Path) -> None:
    remote = _start(loop, tmp_path, _settings(testnet.bootstrap), worker, methods=WORKER_METHODS)
    try:
        key = remote.public_key
        assert loop.run(shim.call(key, "haif.worker.health", {}, timeout_s=10)) == {"ok": True}
        assert loop.run(shim.call(key, "haif.worker.infer", {"prompt": "abc"}, timeout_s=10)) == {"text": "ABC"}

        async def streamed() -> list[Any]:
            return [item async for item in shim.stream(key, "haif.worker.infer", {"prompt": "abc", "stream": True}, timeout_s=10)]

        *chunks, end = loop.run(streamed())
        assert chunks == ["A", "B", "C"]
        assert end["object"] == "haif.stream.end" and end["chunks"] == 3
        with pytest.raises(Overloaded) as overloaded:
            loop.run(shim.call(key, "haif.worker.infer", {"overload": True, "prompt": ""}, timeout_s=10))
        assert overloaded.value.retry_after_s == 3
        with pytest.raises(WorkerUnavailable, match="UNKNOWN_METHOD"):
            loop.run(shim.call(key, "haif.models", {}, timeout_s=10))
        assert wait_for(lambda: shim.status().outbound_peers == 1, what="the outbound peer count")
        with pytest.raises((DeadlineExceeded, WorkerUnavailable)):  # nobody listens on this key
            loop.run(shim.call("ef" * 32, "haif.worker.health", {}, timeout_s=1))
    finally:
        loop.run(remote.stop())


def test_a_killed_sidecar_comes_back_with_the_same_key(loop: LoopThread, testnet: Testnet, tmp_path: Path) -> None:
    sidecar = _start(loop, tmp_path, _settings(testnet.bootstrap), echo_haif)
    try:
        key, pid = sidecar.public_key, sidecar.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sidecar.status().restarts == 1 and sidecar.state is SidecarState.UP, what="the restart")
        assert sidecar.pid != pid
        assert sidecar.public_key == key == public_key_hex(tmp_path / "seed")
        report = run_peer(testnet.bootstrap, key, [{"method": "haif.models", "value": {}}])
        assert report["results"][0]["value"]["object"] == "list"
    finally:
        loop.run(sidecar.stop())
    assert sidecar.state is SidecarState.STOPPED and sidecar.pid is None
