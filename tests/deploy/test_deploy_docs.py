"""The ways to deploy in docs/deploy.md work as written: the doc's marked blocks are run.

Each block after a ``<!-- deploy-test: NAME -->`` comment is run by bash, in a copy of
the repository in a temporary directory, on a Ray cluster of this test's own (its own
ports, temp dir and ``HOME``, so its auth token and its processes are its own). What the
test adds, and nothing more:

* to ``ray start --head``: the cluster's ports, its temp dir, ``--num-cpus`` and
  ``--block`` (the test owns the cluster through that process, and stops only it: ``ray
  stop`` would stop every Ray cluster of the machine);
* to every block's environment: ``RAY_ADDRESS`` (this cluster), ``HAIF_SERVER__PORT`` (a
  free port) and the models, as ``HAIF_*`` overrides (the echo runtime under
  ``configs/local.yaml``'s model name, so that the test spends its time on the deploy,
  not on loading weights; real models are served in the integration tier);
* ``HAIF_URL`` and ``HAIF_KEY`` from the lines the deployment printed, where the doc
  says to take them from there.

``make serve`` is ``haif serve --config configs/local.yaml``, which the integration and
chaos tiers run (tests/integration/test_p2p_serve.py, tests/chaos/test_serve_stop.py):
here only that the doc, the Makefile and those tests agree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.deployment import read_until
from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
MODEL = "tiny-llama"
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
AGENT_WAIT_S = 60
TOKEN = re.compile(r"haif_[0-9a-z]{12}_[\w-]{20,}")  # a HAIF API key (haif.store.tokens)
_BLOCK = re.compile(r"<!-- deploy-test: (?P<name>[\w-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)


def doc_blocks(text: str | None = None) -> dict[str, str]:
    """The doc's marked blocks, by name."""
    text = DOC.read_text(encoding="utf-8") if text is None else text
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def _copy_repo(dest: Path) -> None:
    """The repository's files as a checkout has them (tracked, and untracked unless ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


@dataclass
class Cluster:
    repo: Path
    env: dict[str, str]
    proc: subprocess.Popen
    auth_prelude: str  # the ray-start block's lines other than `ray start`: "every shell"

    def run(self, script: str, timeout_s: float = JOB_TIMEOUT_S, env: dict[str, str] | None = None,
            prelude: bool = True) -> subprocess.CompletedProcess:
        body = (self.auth_prelude if prelude else "") + script
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body], cwd=self.repo, env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=timeout_s,
        )

    def submit(self, script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a block that submits a job; the dashboard answers before its job agent is up,
        and until then a submission is refused: try again, as an operator would."""
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            proc = self.run(script, env=env)
            if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
                return proc
            if time.monotonic() > deadline:
                return proc
            time.sleep(1.0)


def _stop_group(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("deploy")
    repo, home, temp_dir = tmp / "repo", tmp / "home", Path(f"/tmp/haif-deploy-{os.getpid()}")
    _copy_repo(repo)
    home.mkdir()
    gcs_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HAIF_"))}
    env.update({
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        "HAIF_SERVER__PORT": str(http_port),
        "HAIF_MODELS": json.dumps([{"name": MODEL, "runtime": "echo"}]),
        "HAIF_ARTIFACTS__DEV_PUBLISH": "[]",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    block = doc_blocks()["ray-start"]
    assert re.search(r"^ray start --head$", block, re.MULTILINE), block
    flags = (
        f" --port {gcs_port} --dashboard-host 127.0.0.1 --dashboard-port {dashboard_port}"
        f" --dashboard-agent-listen-port {free_port()} --ray-client-server-port {free_port()}"
        f" --temp-dir {temp_dir} --num-cpus 4 --block"
    )
    script = block.replace("ray start --head", "ray start --head" + flags)
    prelude = "".join(line + "\n" for line in block.splitlines() if not line.startswith("ray start"))
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script], cwd=repo, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        read_until(proc, "Ray runtime started", START_TIMEOUT_S)
        yield Cluster(repo, env, proc, prelude)
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class Deployed:
    url: str
    key: str
    output: str


@pytest.fixture(scope="module")
def deployed(cluster: Cluster) -> Deployed:
    proc = cluster.submit(doc_blocks()["job-submit"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    url = re.search(r"^URL: (\S+)$", out, re.MULTILINE)
    key = re.search(r"^API key: (\S+)$", out, re.MULTILINE)
    assert url and key, out[-6000:]
    return Deployed(url[1], key[1], out)


def test_job_submit_deploys_and_answers(cluster: Cluster, deployed: Deployed) -> None:
    assert deployed.url == f"http://127.0.0.1:{cluster.env['HAIF_SERVER__PORT']}"
    # HAIF_BASE_DIR kept the state out of Ray's copy of the working directory: no warning,
    # and the development key is in the checkout's own state dir.
    assert "temporary copy of the job's working directory" not in deployed.output
    assert (cluster.repo / ".haif" / "dev_api_key").read_text().strip() == deployed.key
    script = "\n".join(
        line for line in doc_blocks()["requests"].splitlines() if not line.startswith("export HAIF_URL=")
    )
    proc = cluster.run(script, env={"HAIF_URL": deployed.url, "HAIF_KEY": deployed.key}, timeout_s=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    models, chat = (json.loads(part) for part in proc.stdout.replace("}{", "}\n{").splitlines()[:2])
    assert MODEL in [m["id"] for m in models["data"]]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]


def test_without_ray_auth_mode_a_submission_is_refused(cluster: Cluster, deployed: Deployed) -> None:
    """What docs/deploy.md says happens without `export RAY_AUTH_MODE=token`."""
    proc = cluster.run("ray job submit -- python -c pass\n", prelude=False, timeout_s=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "RAY_AUTH_MODE is currently 'disabled'" in out, out[-3000:]


def test_sdk_from_a_job(cluster: Cluster, deployed: Deployed) -> None:
    proc = cluster.submit(doc_blocks()["sdk-job"], env={"HAIF_KEY": deployed.key})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    result = re.search(r"^RESULT (\{.*\})$", out, re.MULTILINE)
    assert result, out[-6000:]
    reply = json.loads(result[1])
    assert reply["text"] and reply["usage"]["completion_tokens"] > 0


def test_serve_run(cluster: Cluster, deployed: Deployed) -> None:
    block = doc_blocks()["serve-run"]
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", cluster.auth_prelude + block],
        cwd=cluster.repo, env=cluster.env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        read_until(proc, "Application 'haif' is ready", JOB_TIMEOUT_S)
        headers = {"Authorization": f"Bearer {deployed.key}"}
        resp = httpx.get(f"{deployed.url}/v1/models", headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        resp = httpx.post(
            f"{deployed.url}/v1/completions", headers=headers, timeout=60,
            json={"model": MODEL, "prompt": "Hi", "max_tokens": 4},
        )
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"], resp.text
    finally:
        # Ctrl-C, as the doc says: serve run deletes the application.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                _stop_group(proc)


def test_make_serve_is_what_the_serve_tests_run() -> None:
    assert doc_blocks()["make-serve"].strip() == "make serve"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^serve:.*\n\t(?P<cmd>.+)$", makefile, re.MULTILINE)
    assert recipe and recipe["cmd"] == "exec $(BIN)/haif serve --config configs/local.yaml", recipe
    test = (ROOT / "tests" / "integration" / "test_p2p_serve.py").read_text(encoding="utf-8")
    assert '"serve", "--config", "configs/local.yaml"' in test


def test_a_production_start_mints_and_prints_no_key(cluster: Cluster, deployed: Deployed, tmp_path: Path) -> None:
    """``configs/production.example.yaml`` on PostgreSQL: the deployment starts, prints
    ``URL:`` and no key, mints none (no token row, no key file), and its first admin token
    comes from ``haif admin bootstrap``. Overridden: only what names the production
    machines (hosts, paths, regions' node resources, the billing and OTLP endpoints)."""
    from tests.support.services import fresh_database, postgres_server

    state = tmp_path / "state"
    with postgres_server() as server, fresh_database(server, "haif_prod") as db_url:
        env = {
            "HAIF_DATABASE__URL": db_url,
            "HAIF_REDIS__URL": "null",
            "HAIF_SERVER__HOST": "127.0.0.1",
            "HAIF_SERVER__STATE_DIR": str(state),
            "HAIF_SERVER__CONTROL_RESOURCE": "null",
            "HAIF_SERVER__GATEWAY_REPLICAS": "1",
            "HAIF_REGIONS": json.dumps([{"name": "eu-west"}]),
            "HAIF_SHARDING__HOME_REGIONS": "{}",
            "HAIF_USAGE__WEBHOOK_URL": "null",
            "HAIF_TELEMETRY__OTLP_ENDPOINT": "null",
            "HAIF_ARTIFACTS__REPLICAS": json.dumps([str(tmp_path / "artifacts")]),
            "HAIF_ARTIFACTS__WRITE_QUORUM": "1",
            "HAIF_ARTIFACTS__CACHE_DIR": str(tmp_path / "cache"),
            "HAIF_ARTIFACTS__TRUSTED_KEYS": "[]",
        }
        # The job's environment comes from its runtime env, as docs/deploy.md's block gives it.
        runtime_env = json.dumps({"env_vars": {"HAIF_BASE_DIR": str(cluster.repo), **env}})
        script = (
            f"ray job submit --working-dir . --runtime-env-json {shlex.quote(runtime_env)} "
            "-- python serve_app.py --config configs/production.example.yaml\n"
        )
        proc = cluster.submit(script)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert re.search(r"^URL: http://127\.0\.0\.1:\d+$", out, re.MULTILINE), out[-6000:]
        assert "API key:" not in out and not TOKEN.search(out), out[-6000:]
        assert not (state / "dev_api_key").exists()
        from sqlalchemy import create_engine, text

        engine = create_engine(db_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM api_tokens")).scalar_one() == 0
        finally:
            engine.dispose()
        boot = cluster.run(
            "haif admin bootstrap --tenant ops --config configs/production.example.yaml\n", env=env, timeout_s=120
        )
        assert boot.returncode == 0, boot.stdout + boot.stderr
        token = boot.stdout.strip().splitlines()[-1]
        url = f"http://127.0.0.1:{cluster.env['HAIF_SERVER__PORT']}"
        resp = httpx.get(f"{url}/admin/v1/tenants/ops", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert resp.status_code == 200, resp.text
