"""Property-based fuzzing of the OpenAPI surface: no input may produce a server error."""

from __future__ import annotations

import os
import uuid

import httpx
import pytest
import schemathesis

from tests.support.deployment import Deployment

MAX_EXAMPLES = int(os.environ.get("HAIF_SCHEMATHESIS_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def schema(haif: Deployment):  # noqa: ANN201
    return schemathesis.openapi.from_url(f"{haif.url}/openapi.json")


def fuzz_targets(haif: Deployment) -> dict[str, str]:
    """What the admin API's path parameters are pinned to where a random value could change
    what the rest of the session stands on (token "1" is the development key; a tenant the
    other tests use): a tenant and a token of the fuzzer's own."""
    headers = haif.headers()
    tenant = f"fuzz-{uuid.uuid4().hex[:8]}"
    resp = httpx.post(f"{haif.url}/admin/v1/tenants", json={"name": tenant}, headers=headers, timeout=60)
    assert resp.status_code == 201, resp.text
    resp = httpx.post(f"{haif.url}/admin/v1/tokens", json={"tenant": tenant}, headers=headers, timeout=60)
    assert resp.status_code == 201, resp.text
    return {"name": tenant, "token_id": str(resp.json()["id"])}


def test_no_server_errors(schema, haif: Deployment) -> None:  # noqa: ANN001
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    pinned = fuzz_targets(haif)
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        # Random model names only reach the 404 path; half the time, name a served model.
        @given(case=strategy, model=st.sampled_from([None, "echo", "minilm", "gpu-fallback"]))
        def run(case, model) -> None:  # noqa: ANN001
            if model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
            if case.path.startswith("/admin/v1/") and case.path_parameters:
                for key in set(pinned) & set(case.path_parameters):
                    case.path_parameters[key] = pinned[key]
            response = case.call(base_url=haif.url, headers=haif.headers(), timeout=60)
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            if response.status_code >= 500 and response.status_code not in (503, 504):
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}")
            assert "Traceback" not in response.text

        run()
    assert not failures, "\n".join(failures[:10])
    # The fuzzer really exercised every operation, with both accepted and rejected inputs.
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings"} <= set(statuses)
    assert {"POST /admin/v1/tenants", "PATCH /admin/v1/tenants/{name}", "DELETE /admin/v1/tokens/{token_id}",
            "GET /admin/v1/audit", "POST /admin/v1/workers/{worker_id}/drain"} <= set(statuses)
    assert any(code < 300 for codes in statuses.values() for code in codes), statuses
    assert any(400 <= code < 500 for codes in statuses.values() for code in codes), statuses
    print(statuses)
