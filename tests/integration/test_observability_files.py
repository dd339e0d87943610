"""The shipped alert rules and Grafana dashboard watch metrics that exist.

A PromQL expression that names a metric nobody exports is silently empty: the panel shows
"no data" and the alert never fires. So every expression in deploy/observability/ is parsed
for the metric names it uses, and those are checked against what real replicas (a leader and
a follower, after dispatching payments) answer on ``/metrics``. The file-shape checks need no
process; the scrape runs real replicas, etcd, Postgres and the provider.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.stack.etcd import EtcdCluster
from app.stack.sandbox_process import SandboxProcess
from load.checker import wait_until_settled
from load.loadgen import post_payments
from tests.cluster import TEST_API_KEY, cluster_env, running_replicas
from tests.integration.test_deploy_files import compose_model

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
ALERTS = OBSERVABILITY / "prometheus" / "alerts.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "paydispatch.json"
DATASOURCES = OBSERVABILITY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# The alerts the issue asks for, and the metric each one must watch.
REQUIRED_ALERTS = {
    "PaydispatchNoLeader": "paydispatch_is_leader",
    "PaydispatchOldestPendingTooOld": "paydispatch_oldest_pending_seconds",
    "PaydispatchNeedsReconciliation": "paydispatch_payments",
    "PaydispatchStaleWritesRejected": "paydispatch_fence_rejections_total",
    "PaydispatchProviderErrorRatio": "paydispatch_provider_calls_total",
}

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers, range
    brackets and grouping clauses that are neither functions, keywords nor Grafana variables."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\$\{?\w+\}?", "1", text)  # Grafana variables ($__rate_interval, ...)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = _GROUPING.sub("", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def all_expressions() -> list[tuple[str, str]]:
    rules = [(f"alert {r['alert']}", str(r["expr"])) for r in alert_rules()]
    return rules + list(dashboard_expressions())


# --- the files themselves (no process) -------------------------------------------------------


def test_metric_names_are_read_from_promql_as_prometheus_would() -> None:
    assert metric_names(
        'sum by (le) (rate(a_bucket{route="/x",m=~"b|c"}[5m])) / ignoring(x) b_total offset 1m'
    ) == {"a_bucket", "b_total"}
    assert metric_names("sum(x) < 1 or absent(y{z='1'}) and on() vector(1)") == {"x", "y"}
    assert metric_names("histogram_quantile(0.99, sum(rate(h_bucket[$__rate_interval])))") == {
        "h_bucket"
    }


def test_the_required_alerts_exist_and_watch_their_metric() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}

    for name, metric in REQUIRED_ALERTS.items():
        assert name in rules, f"alert {name} missing from {ALERTS}"
        rule = rules[name]
        assert metric in metric_names(str(rule["expr"])), (name, rule["expr"])
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"]
        assert name in rule["annotations"]["runbook"]
        assert f"`{name}`" in (ROOT / "README.md").read_text(), f"no runbook line for {name}"
    assert rules["PaydispatchNoLeader"]["for"] == "10s"
    assert "absent(paydispatch_is_leader)" in rules["PaydispatchNoLeader"]["expr"]


def test_the_dashboard_covers_what_operators_watch_and_uses_the_provisioned_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))

    for metric in (
        "paydispatch_is_leader",
        "paydispatch_leader_token",
        "paydispatch_provider_calls_total",
        "paydispatch_payments",
        "paydispatch_oldest_pending_seconds",
        "paydispatch_provider_call_duration_seconds_bucket",
        "paydispatch_leadership_transitions_total",
        "paydispatch_fence_rejections_total",
    ):
        assert metric in used, f"the dashboard shows no {metric}"
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    variable = dashboard["templating"]["list"][0]
    assert variable["type"] == "datasource"
    assert variable["current"]["value"] == source["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_compose_observability_profile_mounts_the_shipped_files() -> None:
    services = compose_model("observability")["services"]
    default = compose_model()["services"]

    assert "prometheus" not in default
    assert "grafana" not in default
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["observability"]
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            assert volume["type"] == "bind"
            assert volume["read_only"] is True
            assert Path(volume["source"]).exists(), volume["source"]
        assert all(p["host_ip"] == "127.0.0.1" for p in service["ports"])
    targets = {(v["source"], v["target"]) for v in prometheus["volumes"]}
    assert (str(ALERTS), "/etc/prometheus/alerts.yml") in targets
    scrape = yaml.safe_load((OBSERVABILITY / "prometheus" / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert set(scrape["scrape_configs"][0]["static_configs"][0]["targets"]) == {
        f"replica-{i}:8080" for i in (1, 2, 3)
    }


# --- against real replicas -------------------------------------------------------------------


def exported_names(url: str) -> set[str]:
    """Every sample name a /metrics endpoint can answer with: the samples present plus, for
    families with none yet (a labelled counter nobody incremented), the names their type
    implies, so an expression over a rare label still counts as naming an exported metric."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "gauge": ("",),
    }
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


@pytest.mark.chaos
async def test_every_alert_and_panel_names_a_metric_the_replicas_export(
    database_url: str, etcd: EtcdCluster, provider: SandboxProcess, tmp_path: Path
) -> None:
    env = cluster_env(database_url, etcd.endpoints_csv, PAYDISPATCH_PROVIDER_URL=provider.base_url)
    with running_replicas(2, env, tmp_path) as replicas:
        replicas.wait_leader()
        await post_payments([r.url for r in replicas.all], 10, api_key=TEST_API_KEY)
        assert await wait_until_settled(database_url, 30)
        exported = set().union(*(exported_names(r.url) for r in replicas.all))

    assert "paydispatch_oldest_pending_seconds" in exported
    assert "paydispatch_oldest_unreconciled_seconds" in exported
    unknown = {
        (where, name)
        for where, expr in all_expressions()
        for name in metric_names(expr)
        if name not in exported
    }
    assert not unknown, f"expressions name metrics no replica exports: {sorted(unknown)}"
    assert all(metric_names(expr) for _, expr in all_expressions()), "an expression names none"
