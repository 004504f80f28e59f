"""A billing webhook receiver on loopback for the tests: real HTTP, fails the first attempts on purpose."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.loopback import LoopbackServer


class WebhookReceiver(LoopbackServer):
    """Accepts POSTed usage batches; answers 503 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 2) -> None:
        self.fail_first = fail_first
        self.attempts = 0
        self.deliveries: list[dict[str, Any]] = []  # every accepted POST, duplicates included
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    receiver.attempts += 1
                    failing = receiver.attempts <= receiver.fail_first
                    if not failing:
                        receiver.deliveries.append(json.loads(body))
                        receiver.headers.append(dict(self.headers))
                self.send_response(503 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None

        self.url = f"{self._listen(Handler)}/usage"

    def records(self) -> dict[str, dict[str, Any]]:
        """Records by job id, de-duplicated by batch id as a receiver should."""
        with self._lock:
            seen: dict[str, dict[str, Any]] = {}
            batches: set[str] = set()
            for delivery in self.deliveries:
                if delivery["batch_id"] in batches:
                    continue
                batches.add(delivery["batch_id"])
                for record in delivery["records"]:
                    seen[record["job_id"]] = record
            return seen
