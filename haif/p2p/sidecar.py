"""The Node sidecar under supervision: started, watched, restarted, and spoken to over a socket.

:class:`Sidecar` listens on a Unix socket (mode 0600, in ``state_dir``), starts ``node
sidecar/sidecar.js`` with the socket's path, and accepts one link from it: the first
frame must be ``hello`` with the token it was started with (in its environment) and its
pid. Then frames flow both ways (protocol: ``sidecar/README.md``):

* the sidecar hands over each request a peer makes (``request``); the
  :class:`~haif.p2p.handler.InboundHandler` answers it (``respond``, or ``chunk``... ``end``);
* :meth:`Sidecar.call` and :meth:`Sidecar.stream` ask the sidecar to call a method of a
  remote peer (``call`` → ``chunk``... ``result``).

The frames themselves are handled by :class:`haif.p2p._link.Link`, one per connection.

When the sidecar dies (or its link breaks) the state is ``down``, whatever was in
flight fails (WorkerUnavailable for calls, cancellation for inbound handlers), and it is
started again after a backoff that doubles per death (reset once it stayed up for
``STABLE_AFTER_S``). The key seed file is the sidecar's identity: the same public key
after every restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haif.exceptions import ConfigError, WorkerUnavailable
from haif.p2p._frames import FrameError, read_frame
from haif.p2p._link import Link
from haif.p2p.handler import INBOUND_METHODS
from haif.p2p.keys import public_key_hex

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from haif.config import HaifConfig, P2PConfig
    from haif.p2p.handler import InboundHandler

logger = logging.getLogger(__name__)

SIDECAR_DIR = Path(__file__).resolve().parent / "sidecar"
SIDECAR_SCRIPT = SIDECAR_DIR / "sidecar.js"
VENV_NODE_MODULES = Path(sys.prefix) / "share" / "haif" / "p2p-sidecar" / "node_modules"
# A frame carries a value the sidecar re-encoded, plus the envelope; the value's JSON may
# grow when re-encoded (invalid UTF-8 becomes U+FFFD), hence twice the message bound.
FRAME_OVERHEAD_BYTES = 64 * 1024
HELLO_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
STABLE_AFTER_S = 30.0
# sun_path holds 108 bytes on Linux; a longer state_dir gets its socket in a temp dir.
MAX_SOCKET_PATH_CHARS = 100
TOKEN_ENV = "HAIF_P2P_SIDECAR_TOKEN"
_STRIPPED_ENV = ("HAIF_P2P__BOOTSTRAP",)  # the config is the one source of the bootstrap list


class SidecarState(enum.StrEnum):
    STOPPED = "stopped"  # not started, or stopped
    STARTING = "starting"  # the process runs; its DHT server is not listening yet
    UP = "up"  # listening on the DHT, serving
    DOWN = "down"  # died; restarts after the backoff


@dataclass(frozen=True)
class SidecarStatus:
    state: SidecarState
    public_key: str  # computed from the seed file, in Python
    listening_key: str | None  # the key the sidecar said it listens as (None until up once)
    pid: int | None
    restarts: int
    inbound_peers: int
    outbound_peers: int
    inbound_in_flight: int  # peers' requests being answered
    outbound_in_flight: int  # calls to remote peers waiting for their answer
    last_error: str | None


def node_modules_dir(script: Path) -> Path | None:
    """Where the sidecar's npm packages are: beside the script (``npm ci`` there), else the
    venv's link to them, which ``make install`` makes (``<venv>/share/haif/p2p-sidecar``):
    a copy of the source without them (``ray job submit --working-dir`` leaves out what git
    ignores) still finds the install."""
    for candidate in (script.parent / "node_modules", VENV_NODE_MODULES):
        if (candidate / "@hyperswarm" / "rpc").is_dir():
            return candidate
    return None


def max_frame_bytes(max_message_bytes: int) -> int:
    return 2 * max_message_bytes + FRAME_OVERHEAD_BYTES


class Sidecar:
    """Runs the P2P sidecar and keeps it running; one per process that serves P2P."""

    def __init__(
        self,
        settings: P2PConfig,
        *,
        seed_file: Path,
        runtime_dir: Path,
        handler: InboundHandler,
        methods: Sequence[str] = INBOUND_METHODS,
        script: Path = SIDECAR_SCRIPT,
    ) -> None:
        self._settings = settings
        self._seed_file = seed_file
        self._runtime_dir = runtime_dir
        self._handler = handler
        self._methods = tuple(methods)
        self._script = script
        self._max_frame = max_frame_bytes(settings.max_message_bytes)
        self._token = secrets.token_hex(16)
        self._public_key = ""
        self._listening_key: str | None = None
        self._state = SidecarState.STOPPED
        self._up = asyncio.Event()
        self._stopping = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._socket_path: Path | None = None
        self._socket_dir: Path | None = None  # a temp dir of ours, removed on stop
        self._proc: asyncio.subprocess.Process | None = None
        self._link: Link | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._restarts = 0
        self._last_error: str | None = None
        self._node_modules: Path | None = None

    @classmethod
    def from_config(
        cls, config: HaifConfig, handler: InboundHandler, *, methods: Sequence[str] = INBOUND_METHODS
    ) -> Sidecar:
        return cls(
            config.p2p,
            seed_file=config.p2p_seed_path(),
            runtime_dir=config.state_path() / "p2p",
            handler=handler,
            methods=methods,
        )

    # --- state -----------------------------------------------------------------------------

    @property
    def state(self) -> SidecarState:
        return self._state

    @property
    def public_key(self) -> str:
        """The shim's public key (64 hex), known once started."""
        return self._public_key

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def status(self) -> SidecarStatus:
        link = self._link
        inbound, outbound = link.peers if link is not None else (0, 0)
        requests, calls = link.in_flight if link is not None else (0, 0)
        return SidecarStatus(
            state=self._state,
            public_key=self._public_key,
            listening_key=self._listening_key,
            pid=self.pid,
            restarts=self._restarts,
            inbound_peers=inbound,
            outbound_peers=outbound,
            inbound_in_flight=requests,
            outbound_in_flight=calls,
            last_error=self._last_error,
        )

    async def wait_up(self, timeout_s: float) -> bool:
        """Whether the sidecar is up within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._up.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the sidecar and its supervisor; returns before it is up (see wait_up).

        Raises:
            ConfigError: Node, the script or its npm dependencies are missing; the seed file
                is unusable.
        """
        if self._supervisor is not None:
            raise RuntimeError("the sidecar is already started")
        node = shutil.which(self._settings.node)
        if node is None:
            raise ConfigError(f"p2p.node: {self._settings.node!r} is not an executable on PATH")
        if not self._script.is_file():
            raise ConfigError(f"the P2P sidecar script {self._script} is missing")
        self._node_modules = node_modules_dir(self._script)
        if self._node_modules is None:
            raise ConfigError(
                f"the P2P sidecar's npm dependencies are not installed: run `make install` "
                f"(npm ci in {self._script.parent})"
            )
        self._public_key = public_key_hex(self._seed_file)
        self._socket_path = self._make_socket_path()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self._socket_path))
        os.chmod(self._socket_path, 0o600)
        self._stopping.clear()
        self._supervisor = asyncio.create_task(self._supervise(node), name="haif-p2p-supervisor")

    async def stop(self) -> None:
        """Stops the sidecar (SIGTERM, then SIGKILL after a grace period) and the supervisor."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        if self._link is not None:
            self._link.close("the P2P sidecar stopped")
            self._link_lost()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        self._state = SidecarState.STOPPED

    def _make_socket_path(self) -> Path:
        self._runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._runtime_dir / f"sidecar-{os.getpid()}-{secrets.token_hex(4)}.sock"
        if len(str(path)) <= MAX_SOCKET_PATH_CHARS:
            return path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="haif-p2p-"))
        return self._socket_dir / "sidecar.sock"

    def _arguments(self) -> list[str]:
        s = self._settings
        args = [
            str(self._script),
            "--socket", str(self._socket_path),
            "--seed-file", str(self._seed_file),
            "--host", s.bind_host(),
            "--max-message-bytes", str(s.max_message_bytes),
            "--max-frame-bytes", str(self._max_frame),
            "--max-concurrent", str(s.max_concurrent),
            "--max-unverified", str(s.max_concurrent_unverified),
            "--max-connections", str(s.max_connections),
            "--request-timeout-ms", str(math.ceil(s.request_timeout_s * 1000)),
        ]
        for node in s.bootstrap or ():
            args += ["--bootstrap", node]
        for method in self._methods:
            args += ["--method", method]
        return args

    async def _supervise(self, node: str) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._settings.restart_backoff_initial_s
        while not self._stopping.is_set():
            started = loop.time()
            await self._run_once(node)
            if self._stopping.is_set():
                return
            self._state = SidecarState.DOWN
            if loop.time() - started >= STABLE_AFTER_S:
                backoff = self._settings.restart_backoff_initial_s
            logger.warning("P2P sidecar down (%s); restarting in %.1f s", self._last_error, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self._settings.restart_backoff_max_s)
            self._restarts += 1

    async def _run_once(self, node: str) -> None:
        self._state = SidecarState.STARTING
        env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
        env[TOKEN_ENV] = self._token
        if self._node_modules is not None and self._node_modules != self._script.parent / "node_modules":
            env["NODE_PATH"] = str(self._node_modules)  # the venv's install (see node_modules_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                node, *self._arguments(),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            self._last_error = f"cannot start {node}: {exc.strerror}"
            return
        self._proc = proc
        logs = asyncio.create_task(_forward_logs(proc), name="haif-p2p-logs")
        returncode = await proc.wait()
        await logs
        self._last_error = (
            f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
        )
        if self._link is not None:
            self._link.close(f"the P2P sidecar died ({self._last_error})")
            self._link_lost()

    # --- the link --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(read_frame(reader, self._max_frame), HELLO_TIMEOUT_S)
        except (TimeoutError, FrameError, ConnectionError) as exc:
            logger.warning("P2P link refused: no hello (%s)", exc)
            writer.close()
            return
        proc = self._proc
        if (
            hello is None
            or hello.get("op") != "hello"
            or not hmac.compare_digest(str(hello.get("token", "")), self._token)
            or proc is None
            or hello.get("pid") != proc.pid
        ):
            logger.warning("P2P link refused: not the sidecar this process started")
            writer.close()
            return
        link = Link(
            writer,
            handler=self._handler,
            max_frame_bytes=self._max_frame,
            max_message_bytes=self._settings.max_message_bytes,
            max_stream_buffer_bytes=self._settings.max_stream_buffer_bytes,
            on_ready=self._on_ready,
        )
        if self._link is not None:
            self._link.close("a new sidecar link replaced this one")
        self._link = link
        await link.run(reader)
        if self._link is link:
            self._link_lost()

    def _link_lost(self) -> None:
        self._link = None
        self._up.clear()
        if self._state is SidecarState.UP:
            self._state = SidecarState.DOWN

    def _on_ready(self, frame: dict[str, Any]) -> None:
        self._listening_key = str(frame.get("public_key", ""))
        if self._listening_key != self._public_key:
            # The seed file changed under us: what `haif p2p info` prints is not what peers see.
            self._last_error = f"listening as {self._listening_key}, not the seed file's {self._public_key}"
            logger.error("P2P sidecar %s (%s changed?)", self._last_error, self._seed_file)
        self._state = SidecarState.UP
        self._up.set()
        logger.info(
            "P2P sidecar up: public key %s, bootstrap %s, host %s",
            self._public_key, frame.get("bootstrap") or "public DHT", frame.get("host"),
        )

    def _current_link(self) -> Link:
        link = self._link
        if link is None or link.closed:
            raise WorkerUnavailable(f"the P2P sidecar is {self._state.value}")
        return link

    # --- outbound --------------------------------------------------------------------------

    async def call(self, peer: str, method: str, value: Any, *, timeout_s: float) -> Any:
        """Calls ``method`` of the remote peer ``peer`` (hex public key) and returns its answer.

        Raises:
            InvalidRequest: ``peer`` is not a public key, or the value is too large.
            DeadlineExceeded: no answer within ``timeout_s``.
            WorkerUnavailable: the sidecar or the peer cannot be reached, or the peer does
                not serve ``method``.
            HaifError: the error the peer answered with (haif/p2p/errors.py).
        """
        return await self._current_link().call(peer, method, value, timeout_s=timeout_s)

    async def stream(
        self, peer: str, method: str, value: dict[str, Any], *, timeout_s: float
    ) -> AsyncIterator[Any]:
        """Like :meth:`call` for a streamed answer: yields each chunk the peer streams, then
        the peer's own answer (a shim's ``haif.stream.end`` summary) as the last item.

        ``value["haif"]["request_id"]`` names the stream; one is set when missing.
        ``timeout_s`` bounds the whole stream.
        """
        chunks = self._current_link().stream(peer, method, value, timeout_s=timeout_s)
        async with contextlib.aclosing(chunks):
            async for item in chunks:
                yield item


async def _forward_logs(proc: asyncio.subprocess.Process) -> None:
    """The sidecar's stderr, line by line, into this process's log."""
    if proc.stderr is None:
        return
    while True:
        try:
            line = await proc.stderr.readline()
        except ValueError:  # a line past the reader's limit: take what is there
            line = await proc.stderr.read(64 * 1024)
        if not line:
            return
        logger.info("%s", line.decode(errors="replace").rstrip())
