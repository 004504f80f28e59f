"""Property-based fuzzing of the OpenAPI surface: no input may produce a server error."""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from tests.integration.conftest import Deployment

MAX_EXAMPLES = int(os.environ.get("HAIF_SCHEMATHESIS_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def schema(haif: Deployment):  # noqa: ANN201
    return schemathesis.openapi.from_url(f"{haif.url}/openapi.json")


def test_no_server_errors(schema, haif: Deployment) -> None:  # noqa: ANN001
    from hypothesis import HealthCheck, given, settings

    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case) -> None:  # noqa: ANN001
            response = case.call(base_url=haif.url, headers=haif.headers(), timeout=60)
            if response.status_code >= 500 and response.status_code not in (503, 504):
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}")
            assert "Traceback" not in response.text

        run()
    assert not failures, "\n".join(failures[:10])
