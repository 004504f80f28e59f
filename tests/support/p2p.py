"""P2P test helpers: a local hyperdht testnet, an event loop in a thread, a Node peer.

The testnet and the peer are the sidecar package's own tools (``haif/p2p/sidecar/tools``),
which use the real @hyperswarm/rpc: what a peer outside HAIF would run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from haif.p2p.sidecar import SIDECAR_DIR

T = TypeVar("T")
TOOLS = SIDECAR_DIR / "tools"
NODE = shutil.which("node") or "node"
PEER_TIMEOUT_S = 60.0


def require_sidecar_install() -> None:
    """Fails (never skips) when `make install` has not installed the sidecar's npm packages."""
    if not (SIDECAR_DIR / "node_modules" / "@hyperswarm" / "rpc").is_dir():
        raise RuntimeError(f"run `make install` first: {SIDECAR_DIR}/node_modules is missing")


class Testnet:
    """``tools/testnet.js``: a few DHT nodes on 127.0.0.1 while the block runs."""

    def __enter__(self) -> Self:
        require_sidecar_install()
        self._proc = subprocess.Popen(
            [NODE, str(TOOLS / "testnet.js")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the testnet did not start (exit {self._proc.wait()})")
        self.bootstrap: list[str] = json.loads(line)["bootstrap"]
        return self

    def __exit__(self, *_: Any) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class LoopThread:
    """An asyncio loop in a daemon thread: fixtures keep async objects alive across tests."""

    def __enter__(self) -> Self:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __exit__(self, *_: Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def run_peer(bootstrap: list[str], server: str, calls: list[dict[str, Any]], seed: bytes | None = None) -> dict[str, Any]:
    """Runs ``tools/peer.js``: the calls in order, on one connection; its JSON report."""
    spec: dict[str, Any] = {"bootstrap": bootstrap, "server": server, "calls": calls}
    if seed is not None:
        spec["seed"] = seed.hex()
    done = subprocess.run(
        [NODE, str(TOOLS / "peer.js")],
        input=json.dumps(spec), capture_output=True, text=True, timeout=PEER_TIMEOUT_S, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peer.js failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout)


def node_public_key(seed: bytes) -> str:
    """The public key hyperdht's own ``keyPair(seed)`` gives."""
    done = subprocess.run(
        [NODE, "-e", "process.stdout.write(require('hyperdht').keyPair(Buffer.from(process.argv[1], 'hex')).publicKey.toString('hex'))", seed.hex()],
        cwd=SIDECAR_DIR, capture_output=True, text=True, timeout=30, check=True,
    )
    return done.stdout
