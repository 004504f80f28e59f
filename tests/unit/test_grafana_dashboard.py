"""The Grafana dashboard in configs/grafana queries exactly the metrics HAIF exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from haif.telemetry._catalog import CATALOG, SPECS, MetricSpec
from haif.telemetry.metrics import exported_names

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "haif-dashboard.json"
METRIC = re.compile(r"\b(haif_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def spec_of(series: str) -> MetricSpec:
    for name in (series, *(series.removesuffix(s) for s in ("_bucket", "_sum", "_count"))):
        if name in SPECS:
            return SPECS[name]
    raise AssertionError(f"{series} is not exported")


def test_dashboard_is_a_grafana_dashboard(dashboard: dict) -> None:
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["expr"].strip()


def test_every_query_uses_exported_metrics_and_their_labels(dashboard: dict) -> None:
    exported = exported_names()
    for expr in queries(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        found = METRIC.findall(expr)
        assert found, f"query references no HAIF metric: {expr}"
        labels: set[str] = set()
        for series, selector in found:
            assert series in exported, f"{series} (in {expr!r}) is not exported"
            spec = spec_of(series)
            known = set(spec.labels) | ({"le"} if series.endswith("_bucket") else set())
            labels |= known
            for name in MATCHER.findall(selector):
                assert name in known, f"{series} has no label {name!r} (in {expr!r})"
        for group in GROUPING.findall(expr):
            for name in filter(None, (g.strip() for g in group.split(","))):
                assert name in labels, f"grouping by {name!r}, which no metric of {expr!r} has"


def test_every_exported_metric_is_on_the_dashboard(dashboard: dict) -> None:
    used = {spec_of(series).name for expr in queries(dashboard) for series, _ in METRIC.findall(expr)}
    missing = [spec.name for spec in CATALOG if spec.name not in used]
    assert not missing, f"metrics without a panel: {missing}"
