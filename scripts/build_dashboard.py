"""Write the Grafana dashboard shipped by the chart (files/dashboards/finetune-operator.json).

The panels are declared here, as data, so the queries stay readable and a test can check
every metric they use is one the operator exports. Run: python scripts/build_dashboard.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DASHBOARD_PATH = (
    Path(__file__).resolve().parents[1]
    / "charts"
    / "finetune-operator"
    / "files"
    / "dashboards"
    / "finetune-operator.json"
)
NS = 'namespace=~"$namespace"'

# (title, panel type, unit, [(PromQL, legend)], width)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], int]] = [
    (
        "FineTuneJobs by phase",
        "timeseries",
        "short",
        [(f"sum by (phase) (finetune_jobs{{{NS}}})", "{{phase}}")],
        12,
    ),
    (
        "Jobs training now",
        "stat",
        "short",
        [(f'sum(finetune_jobs{{{NS}, phase="Training"}})', "training")],
        6,
    ),
    (
        "Jobs queued (Kueue)",
        "stat",
        "short",
        [(f'sum(finetune_jobs{{{NS}, phase="Queued"}})', "queued")],
        6,
    ),
    (
        "GPU-hours consumed",
        "timeseries",
        "h",
        [
            (
                f"sum by (namespace, gpu_product) (increase(finetune_job_gpu_seconds_total{{{NS}}}[$__rate_interval])) / 3600",
                "{{namespace}} {{gpu_product}}",
            )
        ],
        12,
    ),
    (
        "Quality gate results",
        "barchart",
        "short",
        [
            (
                f"sum by (metric, result) (increase(finetune_job_gate_results_total{{{NS}}}[$__range]))",
                "{{metric}} {{result}}",
            )
        ],
        12,
    ),
    (
        "Failures and errors by reason",
        "timeseries",
        "ops",
        [
            (
                f"sum by (reason) (rate(finetune_job_errors_total{{{NS}}}[$__rate_interval]))",
                "{{reason}}",
            )
        ],
        8,
    ),
    (
        "Reconcile duration",
        "timeseries",
        "s",
        [
            (
                f"histogram_quantile(0.5, sum by (le) (rate(finetune_job_reconcile_duration_seconds_bucket{{{NS}}}[$__rate_interval])))",
                "p50",
            ),
            (
                f"histogram_quantile(0.95, sum by (le) (rate(finetune_job_reconcile_duration_seconds_bucket{{{NS}}}[$__rate_interval])))",
                "p95",
            ),
        ],
        8,
    ),
    (
        "Status writes",
        "timeseries",
        "ops",
        [
            (
                f"sum by (result) (rate(finetune_job_status_writes_total{{{NS}}}[$__rate_interval]))",
                "{{result}}",
            )
        ],
        8,
    ),
    (
        "Adapters served",
        "table",
        "short",
        [(f"max by (namespace, adapter, digest, target) (finetune_adapter_info{{{NS}}})", "")],
        12,
    ),
    (
        "Rollout duration",
        "timeseries",
        "s",
        [
            (
                f"histogram_quantile(0.95, sum by (le, strategy) (rate(finetune_adapter_rollout_duration_seconds_bucket{{{NS}}}[$__rate_interval])))",
                "p95 {{strategy}}",
            )
        ],
        6,
    ),
    (
        "Rollbacks",
        "stat",
        "short",
        [
            (
                f"sum by (reason) (increase(finetune_adapter_rollbacks_total{{{NS}}}[$__range]))",
                "{{reason}}",
            )
        ],
        6,
    ),
    (
        "Schedules: days since the last successful run",
        "bargauge",
        "d",
        [
            (
                f"(time() - max by (namespace, name) (finetune_schedule_last_success_timestamp_seconds{{{NS}}})) / 86400",
                "{{namespace}}/{{name}}",
            )
        ],
        12,
    ),
    (
        "Schedule runs and promotion decisions",
        "timeseries",
        "short",
        [
            (
                f"sum by (trigger, outcome) (increase(finetune_schedule_runs_total{{{NS}}}[$__rate_interval]))",
                "runs {{trigger}} {{outcome}}",
            ),
            (
                f"sum by (decision) (increase(finetune_schedule_promotion_decisions_total{{{NS}}}[$__rate_interval]))",
                "{{decision}}",
            ),
        ],
        12,
    ),
]


def panel(
    index: int, x: int, y: int, spec: tuple[str, str, str, list[tuple[str, str]], int]
) -> dict[str, Any]:
    title, kind, unit, queries, width = spec
    targets: list[dict[str, Any]] = []
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        target: dict[str, Any] = {
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "expr": expr,
            "legendFormat": legend,
            "refId": ref,
        }
        if kind == "table":
            target.update({"format": "table", "instant": True})
        targets.append(target)
    return {
        "id": index + 1,
        "title": title,
        "type": kind,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": targets,
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = 0
    for index, spec in enumerate(PANELS):
        width = spec[4]
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(index, x, y, spec))
        x += width
    return {
        "title": "finetune-operator",
        "uid": "finetune-operator",
        "tags": ["finetune", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "1m",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    # Every namespace the operator has seen a FineTuneJob in (decision 1700).
                    "query": "label_values(finetune_job_reconcile_duration_seconds_count, namespace)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(render())
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
