"""The loopback HTTP servers of the tests (OTLP receiver, billing webhook) start and stop alike."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class LoopbackServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) that serves while the block runs."""

    def _listen(self, handler: type[BaseHTTPRequestHandler]) -> str:
        """Bind ``handler``; return the base URL (``http://127.0.0.1:<port>``)."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
