"""The chart's alert rules (PrometheusRule, off by default) as Prometheus loads them:
`promtool check rules`, `promtool test rules` (tests/chart/prometheus/alerts-test.yaml) and a
runbook for every alert in docs/troubleshooting.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import promtool
from support.chartlib import ROOT, by_kind, manifests, one

# Renders the chart and runs promtool on its alert rules.
pytestmark = pytest.mark.slow

TESTS = Path(__file__).with_name("prometheus") / "alerts-test.yaml"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
# Values the unit tests are written for: one hour, so a test can wait it out.
TEST_VALUES: dict[str, Any] = {
    "prometheusRule": {
        "enabled": True,
        "noRecentSuccess": {"hours": 1, "namespaces": ".+"},
        "scheduleStale": {"hours": 1},
    }
}


def rules(values: dict[str, Any]) -> list[dict[str, Any]]:
    spec = one(manifests(values), "PrometheusRule")["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def write_rules(values: dict[str, Any], folder: Path) -> Path:
    spec = one(manifests(values), "PrometheusRule")["spec"]
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    return path


def test_no_rules_unless_asked_for() -> None:
    assert by_kind(manifests(), "PrometheusRule") == []


def test_rules_load_in_prometheus(tmp_path: Path) -> None:
    for values in (TEST_VALUES, {"prometheusRule": {"enabled": True}}):
        out = promtool.run("check", "rules", write_rules(values, tmp_path))
        assert "SUCCESS" in out


def test_rules_fire_on_the_first_event_and_only_then(tmp_path: Path) -> None:
    write_rules(TEST_VALUES, tmp_path)
    shutil.copy(TESTS, tmp_path / TESTS.name)
    promtool.run("test", "rules", TESTS.name, cwd=tmp_path)


def test_every_alert_is_covered_by_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {r["alert"] for r in rules(TEST_VALUES)} == tested


def test_every_alert_links_to_its_runbook() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in TROUBLESHOOTING.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in rules(TEST_VALUES):
        url = rule["annotations"]["runbook_url"]
        assert url.endswith("docs/troubleshooting.md#" + rule["alert"].lower()), url
        assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}


def test_the_no_success_alert_can_be_turned_off_and_scoped() -> None:
    off = {"prometheusRule": {"enabled": True, "noRecentSuccess": {"hours": 0, "namespaces": ".+"}}}
    assert "FineTuneNoRecentSuccess" not in {r["alert"] for r in rules(off)}
    scoped = {
        "prometheusRule": {
            "enabled": True,
            "noRecentSuccess": {"hours": 24, "namespaces": "team-.*"},
            "labels": {"release": "kube-prometheus-stack"},
        }
    }
    (alert,) = [r for r in rules(scoped) if r["alert"] == "FineTuneNoRecentSuccess"]
    assert 'namespace=~"team-.*"' in alert["expr"] and "> 24 * 3600" in alert["expr"]
    rule = one(manifests(scoped), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
