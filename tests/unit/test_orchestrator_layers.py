"""The Orchestrator's layers, without Ray: each module imports only the layers below its
own, and a deployment built from its parts (no cluster, no store) answers a Gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from haif.config import HaifConfig
from haif.orchestrator.compose import OrchestratorParts
from haif.orchestrator.deployment import Orchestrator
from haif.orchestrator.fleet_state import FleetState, plan_fleets
from haif.telemetry.metrics import OrchestratorMetrics, ProcessMetrics

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "haif" / "orchestrator"
# The control plane's modules by layer (see haif/orchestrator/__init__.py); a module may
# import the ones of a lower number (inside a layer, its lower modules).
LAYERS = {
    "rollout": 0, "autoscale": 0, "placement": 0, "table": 0,
    "fleet": 1.0, "model_fleet": 1.1, "fleet_state": 1.2,
    "health": 2,
    "control.store": 3.0, "control.rollouts": 3.1, "control.canary": 3.1, "control.autoscaling": 3.1,
    "control.drains": 3.1,
    "compose": 4.0, "deployment": 4.1,
}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
    prefix = "haif.orchestrator."
    found = set()
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        )
        found |= {n[len(prefix):] for n in names if n.startswith(prefix)}
    return found


def test_each_layer_imports_only_the_layers_below_it() -> None:
    for module, layer in LAYERS.items():
        for imported in _imports(module) & set(LAYERS):
            assert LAYERS[imported] < layer, f"{module} (layer {layer}) imports {imported}"


def test_no_module_of_the_orchestrator_is_long() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert len(path.read_text().splitlines()) < 600, path


def _orchestrator(models: list[dict[str, object]]) -> Orchestrator:
    config = HaifConfig.model_validate({"models": models})
    fleet = FleetState(config, plan_fleets(config, cluster_gpus=0.0), app="haif", leader=True, worker=None)
    metrics = OrchestratorMetrics(ProcessMetrics("orchestrator"))
    return Orchestrator(config, parts=OrchestratorParts.of(config, fleet, metrics))


async def test_an_orchestrator_of_parts_publishes_its_fleet_and_takes_gateway_reports() -> None:
    scaled = {"name": "m", "runtime": "echo", "autoscaling": {"min_workers": 0, "max_workers": 2}}
    orchestrator = _orchestrator([scaled])
    assert orchestrator.models() == ["m"]
    status = orchestrator.status()
    assert status["leader"] and status["ready"], status
    assert status["models"]["m"]["scaled_to_zero"] and status["models"]["m"]["workers"] == 0

    report = {"gateway": "g1", "queued": {"m": 3}, "outcomes": {"m": {"1": [5, 0]}}}
    table = await orchestrator.listen(None, 0.0, report)
    assert table.version == status["table_version"]  # type: ignore[attr-defined]
    assert table.models["m"].scaled_to_zero  # type: ignore[attr-defined]
