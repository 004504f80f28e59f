"""The sidecar's own Node test suite (`node --test`), run here so that CI runs it too."""

from __future__ import annotations

import subprocess

import pytest

from haif.p2p.sidecar import SIDECAR_DIR
from tests.support.p2p import NODE, require_sidecar_install

pytestmark = pytest.mark.integration


def test_the_node_suite_passes() -> None:
    require_sidecar_install()
    files = sorted(str(p.relative_to(SIDECAR_DIR)) for p in (SIDECAR_DIR / "test").glob("*.test.js"))
    assert files, "no Node tests found"
    done = subprocess.run(
        [NODE, "--test", *files], cwd=SIDECAR_DIR, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
