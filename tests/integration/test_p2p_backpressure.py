"""A P2P peer that reads a stream slower than HAIF makes it: HAIF's stream waits for the
peer (``p2p.max_stream_buffer_bytes``) instead of piling its chunks up in the sidecar or
in Python. The real sidecar and a real @hyperswarm/rpc peer (``tools/peer.js``) on the
session's local testnet; the peer is stopped (SIGSTOP) to read nothing at all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from haif.config import P2PConfig
from haif.p2p import Sidecar
from tests.support.p2p import NODE, TOOLS, LoopThread, run_peer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

CHUNK_BYTES = 16 * 1024
CHUNKS = 2048  # 32 MiB in all
WINDOW_BYTES = 64 * 1024
# What the transport takes before it pushes back (UDX's window, the streams' buffers),
# measured at ~0.3 MiB; a stream without the bound runs to its end (32 MiB) meanwhile.
TRANSPORT_ALLOWANCE_BYTES = 2 * 1024**2
OBSERVE_S = 2.0  # how long the peer reads nothing while the bound is watched


class Streams:
    """The handler: streams ``CHUNKS`` chunks once the test lets it (``go``), counting them."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.produced: dict[str, int] = {}
        self.closed: list[str] = []

    async def __call__(self, method: str, peer: str, value: dict[str, Any]) -> Any:
        if not value.get("stream"):
            return {"object": "chat.completion", "echo": value.get("text")}
        return self._chunks(value["haif"]["request_id"])

    async def _chunks(self, name: str) -> AsyncIterator[dict[str, Any]]:
        pad = "x" * CHUNK_BYTES
        self.produced[name] = 0
        try:
            for i in range(CHUNKS):
                if i == 1:
                    await self.go.wait()
                yield {"i": i, "pad": pad}
                self.produced[name] += 1
        finally:
            self.closed.append(name)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    with LoopThread() as thread:
        yield thread


@pytest.fixture
def shim(loop: LoopThread, testnet: list[str], tmp_path: Path) -> Iterator[tuple[Sidecar, Streams]]:
    streams = loop.run(_make_streams())
    settings = P2PConfig(enabled=True, bootstrap=testnet, max_message_bytes=1024**2,
                         max_stream_buffer_bytes=WINDOW_BYTES, request_timeout_s=60)
    sidecar = Sidecar(settings, seed_file=tmp_path / "seed", runtime_dir=tmp_path / "run", handler=streams)
    loop.run(sidecar.start())
    assert loop.run(sidecar.wait_up(20)), sidecar.status()
    yield sidecar, streams
    loop.run(sidecar.stop())


async def _make_streams() -> Streams:
    return Streams()  # its Event belongs to the loop's thread


def _slow_peer(testnet: list[str], server: str, name: str, timeout_s: float | None = None) -> subprocess.Popen[str]:
    envelope: dict[str, Any] = {"request_id": name}
    if timeout_s is not None:
        envelope["timeout_s"] = timeout_s
    spec = {"bootstrap": testnet, "server": server,
            "calls": [{"method": "haif.chat", "value": {"stream": True, "haif": envelope}, "timeout_ms": 60000}]}
    proc = subprocess.Popen([NODE, str(TOOLS / "peer.js")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    return proc


def _report(peer: subprocess.Popen[str]) -> dict[str, Any]:
    """The peer's JSON report (its own call timeout bounds the read)."""
    assert peer.stdout is not None
    out = peer.stdout.read()
    assert peer.wait(timeout=30) == 0
    return json.loads(out)


def test_a_peer_that_reads_nothing_holds_the_stream_back_and_others_are_served(
    loop: LoopThread, testnet: list[str], shim: tuple[Sidecar, Streams]
) -> None:
    sidecar, streams = shim
    peer = _slow_peer(testnet, sidecar.public_key, "slow-1")
    try:
        wait_for(lambda: streams.produced.get("slow-1") == 1, 30, what="the stream's first chunk")
        base_rss = _rss_bytes(sidecar.pid)  # type: ignore[arg-type]
        os.kill(peer.pid, signal.SIGSTOP)
        loop.loop.call_soon_threadsafe(streams.go.set)
        # The peer reads nothing: the stream goes as far as the bound and the transport
        # take it, and no further, however long the peer sleeps.
        held_max = 0
        deadline = time.monotonic() + OBSERVE_S
        while time.monotonic() < deadline:
            held_max = max(held_max, streams.produced["slow-1"] * CHUNK_BYTES)
            time.sleep(0.05)
        assert held_max <= WINDOW_BYTES + TRANSPORT_ALLOWANCE_BYTES, f"{held_max} bytes made for a peer that read none"
        assert _rss_bytes(sidecar.pid) - base_rss < 16 * 1024**2  # type: ignore[arg-type]
        # One slow peer holds back its own stream only: another peer is served meanwhile.
        started = time.monotonic()
        (other,) = run_peer(testnet, sidecar.public_key, [{"method": "haif.chat", "value": {"text": "hi"}}])["results"]
        assert other["value"] == {"object": "chat.completion", "echo": "hi"}
        assert time.monotonic() - started < 20
        assert streams.produced["slow-1"] * CHUNK_BYTES <= WINDOW_BYTES + TRANSPORT_ALLOWANCE_BYTES
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    (result,) = _report(peer)["results"]
    # Reading again, the peer gets the whole stream, in order.
    assert result["value"] == {"object": "haif.stream.end", "id": "slow-1", "chunks": CHUNKS}
    assert [c["i"] for c in result["chunks"]] == list(range(CHUNKS))
    assert wait_for(lambda: sidecar.status().inbound_in_flight == 0, what="nothing left in flight")


def test_a_stream_held_back_past_its_deadline_ends_and_leaves_nothing_behind(
    loop: LoopThread, testnet: list[str], shim: tuple[Sidecar, Streams]
) -> None:
    sidecar, streams = shim
    peer = _slow_peer(testnet, sidecar.public_key, "stuck-1", timeout_s=3)
    try:
        wait_for(lambda: streams.produced.get("stuck-1") == 1, 30, what="the stream's first chunk")
        os.kill(peer.pid, signal.SIGSTOP)
        loop.loop.call_soon_threadsafe(streams.go.set)
        # The deadline passes while the stream waits for the peer: HAIF stops the stream
        # (its generator is closed) and holds nothing more for it.
        wait_for(lambda: "stuck-1" in streams.closed, 15, what="the held stream closed at its deadline")
        assert streams.produced["stuck-1"] * CHUNK_BYTES <= WINDOW_BYTES + TRANSPORT_ALLOWANCE_BYTES
        assert wait_for(lambda: sidecar.status().inbound_in_flight == 0, what="nothing left in flight")
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    (result,) = _report(peer)["results"]
    assert result["error"]["cause"]["code"] == "TIMEOUT", result
    assert len(result["chunks"]) < CHUNKS
