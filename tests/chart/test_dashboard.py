"""The Grafana dashboard queries only metrics (and labels) the operator really exports."""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest
from support.chartlib import load_script

# Modules that define the operator's Prometheus metrics.
METRIC_MODULES = ("finetune_operator.metrics", "finetune_operator.metrics_serving")


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric the operator's modules define."""
    from prometheus_client import Counter, Gauge, Histogram

    result: dict[str, set[str]] = {}
    for module_name in METRIC_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if not isinstance(value, Counter | Gauge | Histogram):
                continue
            name = value._name  # family name, without _total
            labels = set(value._labelnames)
            if isinstance(value, Counter):
                result[f"{name}_total"] = labels
            elif isinstance(value, Histogram):
                for suffix in ("_bucket", "_sum", "_count"):
                    result[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
            else:
                result[name] = labels
    return result


def queries() -> list[str]:
    dashboard: dict[str, Any] = load_script("build_dashboard").build()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_queried_metric_is_exported() -> None:
    exported = exported_metrics()
    assert exported, "no metrics found in the operator"
    used: set[str] = set()
    for expr in queries():
        for name in re.findall(r"\b(finetune_[a-z0-9_]+)\b", expr):
            used.add(name)
            assert name in exported, f"{expr}: the operator exports no metric {name}"
    # The dashboard covers both controllers.
    assert any(n.startswith("finetune_job") for n in used)
    assert any(n.startswith("finetune_adapter") for n in used)


@pytest.mark.parametrize("expr", queries())
def test_every_label_a_query_uses_exists_on_its_metric(expr: str) -> None:
    exported = exported_metrics()
    metrics = set(re.findall(r"\b(finetune_[a-z0-9_]+)\b", expr))
    selector_labels = set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
    grouping = {
        label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")
    }
    grouping |= set(re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expr))
    for label in selector_labels | grouping:
        assert any(label in exported.get(m, set()) for m in metrics), (
            f"{expr}: label {label!r} is not a label of {sorted(metrics)}"
        )


def test_every_panel_follows_the_namespace_filter() -> None:
    dashboard: dict[str, Any] = load_script("build_dashboard").build()
    for p in dashboard["panels"]:
        for target in p["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"], (
                f"panel {p['title']!r} ignores the namespace filter: {target['expr']}"
            )
