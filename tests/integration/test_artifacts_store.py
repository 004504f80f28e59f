"""The artifact store on S3 through s3fs (a moto server on loopback), local directories, and a mix.

The same cases as tests/unit/test_artifacts_store.py; here every replica URL that says
``s3://`` goes over HTTP to a real S3 endpoint.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.support import artifact_cases as cases
from tests.support.artifacts import MotoS3


def _env(kind: str, moto: MotoS3, tmp_path: Path) -> cases.Env:
    options = {"s3": moto.storage_options()}
    missing_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store"
    if kind == "local":
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        return cases.Env(
            [str(tmp_path / f"replica-{i}") for i in (1, 2, 3)], str(blocker / "r"), tmp_path
        )
    if kind == "s3":
        a, b = moto.create_bucket(), moto.create_bucket()
        return cases.Env(
            [f"s3://{a}/one", f"s3://{a}/two", f"s3://{b}/three"], missing_bucket, tmp_path, options
        )
    bucket = moto.create_bucket()
    return cases.Env(
        [str(tmp_path / "replica-1"), f"s3://{bucket}/store", str(tmp_path / "replica-3")],
        missing_bucket,
        tmp_path,
        options,
    )


@pytest.fixture(params=["local", "s3", "mixed"])
def env(request: pytest.FixtureRequest, moto_s3: MotoS3, tmp_path: Path) -> cases.Env:
    return _env(request.param, moto_s3, tmp_path)


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_case(case, env: cases.Env) -> None:  # noqa: ANN001
    case(env)


@pytest.mark.parametrize("kind", ["s3", "mixed"])
def test_eight_processes_on_one_node_transfer_each_byte_once(
    kind: str, moto_s3: MotoS3, tmp_path: Path
) -> None:
    cases.case_concurrent_pulls_from_processes_transfer_once(_env(kind, moto_s3, tmp_path))
