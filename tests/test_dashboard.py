"""deploy/grafana/pollguard.json is an importable dashboard whose queries name only metrics a
running pollguard exports: each family on /-/metrics, by its `# TYPE` line, with the sample
suffixes its type has."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.job_upstream import guard_config
from tests.servers import running_proxy

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "pollguard.json"

# Anything starting with pollguard_ in a query is a pollguard metric; PromQL is not parsed further.
METRIC_NAME = re.compile(r"\bpollguard_[a-zA-Z0-9_]+")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": (),
}
REQUIRED = {
    "pollguard_requests_total",
    "pollguard_request_duration_seconds_bucket",
    "pollguard_decisions_total",
    "pollguard_reprepares_total",
    "pollguard_jobs",
    "pollguard_upstream_errors_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD.read_text())
    assert isinstance(document, dict)
    return document


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """The PromQL of every panel target and of every query template variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield query["query"] if isinstance(query, dict) else query


def used_metrics(dashboard: dict[str, Any]) -> set[str]:
    return {name for query in queries(dashboard) for name in METRIC_NAME.findall(query)}


def exported_names(exposition: str) -> set[str]:
    """Names a query may use: each family's, and the family's plus each of its type's suffixes."""
    names = set()
    for family, kind in TYPE_LINE.findall(exposition):
        names.add(family)
        names.update(family + suffix for suffix in SAMPLE_SUFFIXES.get(kind, ()))
    return names


def test_dashboard_is_an_importable_document(dashboard: dict[str, Any]) -> None:
    """Title, uid, schemaVersion >= 36, unique panel ids, every non-row panel with a query."""
    assert dashboard["title"]
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    graphs = [panel for panel in panels(dashboard) if panel["type"] != "row"]
    assert graphs
    for panel in graphs:
        assert panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty expr"


def test_dashboard_picks_its_prometheus_and_scrape_targets(dashboard: dict[str, Any]) -> None:
    """A Prometheus datasource variable that every panel uses, and job/instance variables."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert "label_values(" in variables[name]["definition"]
    for panel in panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_uses_the_core_metrics(dashboard: dict[str, Any]) -> None:
    """Traffic, latency, decisions, re-prepares, job states and upstream errors are all shown."""
    assert REQUIRED <= used_metrics(dashboard)


def test_every_metric_in_the_dashboard_is_exported(dashboard: dict[str, Any]) -> None:
    """Each pollguard_ name in a query is a family (or family + type suffix) on /-/metrics."""
    # Nothing listens upstream: the exposition alone is read, and it lists every family.
    config = guard_config(f"http://127.0.0.1:{free_port()}")
    with running_proxy(config) as proxy, httpx.Client(timeout=5.0) as client:
        response = client.get(f"{proxy.url}/-/metrics")
    assert response.status_code == 200
    exported = exported_names(response.text)
    assert "pollguard_decisions_total" in exported  # the exposition was read as intended
    missing = sorted(used_metrics(dashboard) - exported)
    assert not missing, f"not on /-/metrics: {missing}"
