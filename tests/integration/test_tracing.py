"""Traces and logs of one request across every process: the span tree, errors, log ids.

The session's deployment exports to a loopback OTLP/HTTP receiver (``otlp`` fixture,
``telemetry.otlp_endpoint``); each test sends its own ``traceparent`` and reads back the
spans of that trace id only.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from tests.support.deployment import Deployment
from tests.support.otlp import OtlpReceiver, ReceivedSpan

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "trace_chat_stream.json"
UPDATE_GOLDEN = os.environ.get("HAIF_UPDATE_GOLDEN") == "1"
TRACE_WAIT_S = 30.0
QUIET_S = 1.0  # the exporters flush every 200 ms: a trace is complete once this passes quietly


def _client_ids() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def _chat(http: httpx.Client, headers: dict[str, str], content: str) -> tuple[int, str]:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": content}]}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status_code, resp.read().decode()


def _settled_trace(otlp: OtlpReceiver, trace_id: str, at_least: int) -> list[ReceivedSpan]:
    """The trace once ``at_least`` spans are in and no more arrive for QUIET_S."""
    spans = otlp.wait_for_trace(trace_id, at_least, TRACE_WAIT_S)
    deadline = time.monotonic() + TRACE_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(QUIET_S)
        again = otlp.trace(trace_id)
        if len(again) == len(spans):
            break
        spans = again
    return spans


def _tree(spans: list[ReceivedSpan], parent_id: str) -> list[dict[str, Any]]:
    """The spans as a tree under ``parent_id`` (children by name): names, services, kinds,
    statuses and attribute keys, which are the same on every run."""
    children: dict[str | None, list[ReceivedSpan]] = defaultdict(list)
    for s in spans:
        children[s.parent_span_id].append(s)

    def node(s: ReceivedSpan) -> dict[str, Any]:
        return {
            "name": s.name,
            "service": s.service,
            "kind": s.kind,
            "status": s.status,
            "attributes": sorted(s.attributes),
            "children": sorted((node(c) for c in children[s.span_id]), key=lambda n: n["name"]),
        }

    return [node(s) for s in children[parent_id]]


def _count(nodes: list[dict[str, Any]]) -> int:
    return sum(1 + _count(n["children"]) for n in nodes)


def _find(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def test_one_streamed_chat_is_one_trace_matching_the_golden_tree(
    http: httpx.Client, auth: dict[str, str], otlp: OtlpReceiver
) -> None:
    trace_id, parent_id, traceparent = _client_ids()
    status, text = _chat(http, {**auth, "traceparent": traceparent}, "one two three four five")
    assert status == 200, text
    assert text.rstrip().endswith("data: [DONE]")

    golden = json.loads(GOLDEN.read_text())
    spans = _settled_trace(otlp, trace_id, _count(golden))
    tree = _tree(spans, parent_id)
    if UPDATE_GOLDEN:
        GOLDEN.write_text(json.dumps(tree, indent=2) + "\n")
    assert tree == golden, json.dumps(tree, indent=2)
    # One trace: every span links to a span of it, the root to the client's span.
    ids = {s.span_id for s in spans} | {parent_id}
    assert all(s.parent_span_id in ids for s in spans)
    # What the request was, on its spans.
    gateway = _find(spans, "gateway.stream")
    assert gateway.attributes["haif.model"] == "echo"
    assert gateway.attributes["haif.tenant"] == "default"
    assert gateway.attributes["gen_ai.usage.output_tokens"] == 5
    assert gateway.attributes["haif.status"] == "ok"
    worker = _find(spans, "worker.stream")
    route = _find(spans, "gateway.route")
    assert worker.attributes["haif.worker"] == route.attributes["haif.worker"]
    # Where it ran and after how many tries, on the route and the gateway span alike.
    assert route.attributes["haif.region"] == gateway.attributes["haif.region"] == "local"
    assert route.attributes["haif.attempts"] == gateway.attributes["haif.attempts"] == 1
    assert worker.resource["haif.component"] == "worker"
    first_token, stream = _find(spans, "runtime.first_token"), _find(spans, "runtime.stream")
    assert stream.start_ns <= first_token.start_ns <= first_token.end_ns <= stream.end_ns
    bridge = _find(spans, "POST /v1/chat/completions")
    assert bridge.attributes["http.response.status_code"] == 200


def test_a_failed_request_shows_its_error_where_it_happened(
    http: httpx.Client, auth: dict[str, str], otlp: OtlpReceiver
) -> None:
    trace_id, parent_id, traceparent = _client_ids()
    # Over the prompt limit of 1024 tokens: the worker's runtime refuses it.
    status, text = _chat(http, {**auth, "traceparent": traceparent}, "word " * 1100)
    assert status == 422, text

    spans = _settled_trace(otlp, trace_id, 8)
    worker = _find(spans, "worker.stream")
    assert worker.status == "ERROR"
    assert "PromptTooLong" in worker.status_message
    (event,) = [e for e in worker.events if e["name"] == "exception"]
    assert event["attributes"]["exception.type"].endswith("PromptTooLong")
    assert "1024" in event["attributes"]["exception.message"]
    assert worker.attributes["haif.status"] == "context_length_exceeded"
    for name in ("runtime.stream", "gateway.route", "gateway.stream"):
        assert _find(spans, name).status == "ERROR", name
    bridge = _find(spans, "POST /v1/chat/completions")
    assert bridge.parent_span_id == parent_id
    assert bridge.attributes["http.response.status_code"] == 422


def test_a_refused_key_is_traced_without_the_key(
    http: httpx.Client, otlp: OtlpReceiver
) -> None:
    trace_id, _, traceparent = _client_ids()
    secret = "sk-not-a-key-" + secrets.token_hex(16)
    headers = {"Authorization": f"Bearer {secret}", "traceparent": traceparent}
    status, _ = _chat(http, headers, "hello")
    assert status == 401

    spans = _settled_trace(otlp, trace_id, 3)
    auth = _find(spans, "gateway.auth")
    assert auth.status == "ERROR"
    assert any(e["attributes"].get("exception.type", "").endswith("AuthenticationFailed") for e in auth.events)
    assert secret not in repr(spans)


def _log_lines(logs_dir: Path, request_id: str) -> list[dict[str, Any]]:
    found = []
    for path in logs_dir.glob("*.err"):
        with path.open(errors="replace") as f:
            for line in f:
                if request_id not in line or not line.startswith("{"):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("request_id") == request_id:
                    found.append(record)
    return found


def test_logs_of_one_request_share_its_request_and_trace_ids_across_processes(
    http: httpx.Client, auth: dict[str, str], haif: Deployment
) -> None:
    import ray

    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())  # noqa: SLF001
    trace_id, _, traceparent = _client_ids()
    request_id = "logs-" + secrets.token_hex(8)
    status, text = _chat(http, {**auth, "traceparent": traceparent, "X-Request-ID": request_id}, "log me")
    assert status == 200, text

    wanted = {"gateway", "worker"}
    deadline = time.monotonic() + TRACE_WAIT_S
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = _log_lines(logs_dir, request_id)
        if wanted <= {line.get("component") for line in lines}:
            break
        time.sleep(0.2)
    assert wanted <= {line.get("component") for line in lines}, lines
    assert {line["trace_id"] for line in lines} == {trace_id}
    assert len({line["pid"] for line in lines}) >= 2  # two processes (two hops), one request
    tenants = {line.get("tenant") for line in lines if line["component"] in ("gateway", "worker")}
    assert tenants == {"default"}


def test_model_loads_are_traced_with_their_artifact_checks(haif: Deployment, otlp: OtlpReceiver) -> None:
    """The session's workers loaded their models at deployment: each load is a trace."""

    def loads(model: str) -> list[ReceivedSpan]:
        with otlp._lock:  # noqa: SLF001
            return [s for s in otlp.spans
                    if s.name == "worker.load_model" and s.attributes.get("haif.model") == model]

    deadline = time.monotonic() + TRACE_WAIT_S
    while time.monotonic() < deadline and not (loads("signed-echo") and loads("tampered-blob")):
        time.sleep(0.2)
    good, bad = loads("signed-echo"), loads("tampered-blob")
    assert good and bad

    tree = _tree(otlp.trace(good[0].trace_id), good[0].span_id)
    assert {n["name"] for n in tree} == {"artifact.pull", "runtime.load"}
    (pull,) = [n for n in tree if n["name"] == "artifact.pull"]
    assert {c["name"] for c in pull["children"]} == {"artifact.verify_manifest", "artifact.verify_blobs"}
    assert good[0].status == "UNSET" and good[0].service == "haif-worker"

    refused = bad[0]
    assert refused.status == "ERROR" and "ArtifactRejected" in refused.status_message
    checks = [s for s in otlp.trace(refused.trace_id) if s.name.startswith("artifact.verify")]
    assert any(s.status == "ERROR" for s in checks), checks
