"""Every panel of the shipped dashboard, run by a real Prometheus against samples recorded
from the operator's registry: each panel shows the first event of its kind, and only for the
namespace the dashboard's filter selects.

The timeline: the operator sees namespace `dash` (and `other`), five minutes pass, then the
first failure, gate verdict, GPU time, success, rollback and rollout of `dash` happen at once,
and five more minutes pass. One scrape every 15 s, backfilled with
`promtool tsdb create-blocks-from openmetrics`, queried through Prometheus' HTTP API at the
end, with Grafana's variables as Grafana would fill them."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from finetune_operator import metrics, metrics_serving
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import promtool
from support.chartlib import load_script

NS, OTHER = "dash", "other"
SCRAPE_SECONDS = 15
SCRAPES = 40  # 10 minutes; the events happen at scrape 20
GRAFANA = {"$namespace": NS, "$__rate_interval": "1m", "$__range": "10m"}


def scrape(namespaces: set[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("namespace") in namespaces and not s.name.endswith("_created")
    }


def activity() -> None:
    """What the operator does every few seconds in a busy namespace: reconcile, write status."""
    for ns in (NS, OTHER):
        metrics.ftj_reconcile_seconds.labels(ns, "poll").observe(0.02)
        metrics.ftj_status_writes.labels(ns, "written").inc()


def first_sight() -> None:
    """The operator's first reconciles in each namespace (the calls its handlers make)."""
    for ns in (NS, OTHER):
        metrics.see_namespace(ns)
        metrics.see_gpu_product(ns, "NVIDIA-L4")
        metrics.set_ftj_phase(ns, "bot", "Training")
        metrics.set_ftj_phase(ns, "long", "Training")
        metrics.set_ftj_phase(ns, "waiting", "Queued")
        metrics_serving.see(ns, "support", "Canary")
        metrics_serving.set_served(ns, "support", "sha256:" + "a" * 64, "llm")
        metrics.see_schedule_namespace(ns)


def first_events(now: float) -> None:
    """The first event of every kind in `dash`; `other` gets a failure of its own."""
    metrics.set_ftj_phase(NS, "bot", "Failed")
    metrics.ftj_errors.labels(NS, "OOMKilled").inc()
    metrics.ftj_gate_results.labels(NS, "rougeL", "pass").inc()
    metrics.ftj_gpu_seconds.labels(NS, "NVIDIA-L4").inc(1800)
    metrics.record_success(NS, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
    metrics_serving.ROLLOUT_DURATION.labels(NS, "Canary", "RolledBack").observe(240)
    metrics_serving.ROLLBACKS.labels(NS, "support", "CanaryErrorRate").inc()
    metrics.ftj_errors.labels(OTHER, "DataNotFound").inc()
    metrics.fts_runs.labels(NS, "Schedule", "Succeeded").inc()
    metrics.fts_promotions.labels(NS, "Promoted").inc()
    metrics.fts_last_success.labels(NS, "weekly").set(now)


def openmetrics(timeline: list[tuple[float, dict[Any, float]]]) -> str:
    series: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    for at, samples in timeline:
        for key, value in samples.items():
            series.setdefault(key, []).append((at, value))
    lines = []
    for (name, labels), points in sorted(series.items()):
        rendered = ",".join(f'{k}="{v}"' for k, v in labels)
        lines += [f"{name}{{{rendered}}} {value} {at:.3f}" for at, value in points]
    return "\n".join([*lines, "# EOF"]) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    """A Prometheus serving the recorded timeline; yields its URL and the last scrape time."""
    folder = tmp_path_factory.mktemp("prometheus")
    start = time.time() - 3600  # an hour ago: inside the default retention
    first_sight()
    timeline = []
    for i in range(SCRAPES):
        at = start + i * SCRAPE_SECONDS
        if i == SCRAPES // 2:
            first_events(at)
        activity()
        timeline.append((at, scrape({NS, OTHER})))
    (folder / "samples.om").write_text(openmetrics(timeline))
    promtool.run("tsdb", "create-blocks-from", "openmetrics", "samples.om", "data", cwd=folder)
    (folder / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            promtool.binary("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(
                        f"prometheus did not start: {(folder / 'prometheus.log').read_text()}"
                    )
                time.sleep(0.1)
        yield url, timeline[-1][0]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def grafana(expr: str) -> str:
    for variable, value in GRAFANA.items():
        expr = expr.replace(variable, value)
    return expr


def api(prometheus: tuple[str, float], endpoint: str, **params: str) -> list[dict[str, Any]]:
    url, _end = prometheus
    encoded = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{endpoint}?{encoded}", timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def query(prometheus: tuple[str, float], expr: str) -> list[dict[str, Any]]:
    """The expression at the last scrape (what a stat panel over the last 10 minutes shows)."""
    return api(prometheus, "query", query=grafana(expr), time=f"{prometheus[1]:.3f}")


def query_range(prometheus: tuple[str, float], expr: str) -> list[dict[str, Any]]:
    """The expression over the whole timeline, as a time-series panel draws it."""
    end = prometheus[1]
    start = end - (SCRAPES - 1) * SCRAPE_SECONDS
    return api(
        prometheus, "query_range", query=grafana(expr), start=f"{start:.3f}", end=f"{end:.3f}",
        step=str(SCRAPE_SECONDS),
    )  # fmt: skip


def panels() -> list[tuple[str, str]]:
    dashboard = load_script("build_dashboard").build()
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


@pytest.mark.parametrize(("title", "expr"), panels(), ids=[f"{t}: {e[:40]}" for t, e in panels()])
def test_every_panel_shows_the_first_event(
    prometheus: tuple[str, float], title: str, expr: str
) -> None:
    result = query_range(prometheus, expr)
    values = [float(v) for r in result for _t, v in r["values"]]
    assert any(v > 0 and not math.isnan(v) for v in values), f"{title}: {expr} -> {result}"


def test_counters_count_the_first_event_once(prometheus: tuple[str, float]) -> None:
    gates = query(
        prometheus,
        'sum by (metric, result) (increase(finetune_job_gate_results_total{namespace="dash"}[10m]))',
    )
    shown = {(r["metric"]["metric"], r["metric"]["result"]): float(r["value"][1]) for r in gates}
    assert 0.9 < shown[("rougeL", "pass")] < 1.2
    assert all(v == 0 for key, v in shown.items() if key != ("rougeL", "pass"))
    rollbacks = query(
        prometheus, 'sum(increase(finetune_adapter_rollbacks_total{namespace="dash"}[10m]))'
    )
    assert 0.9 < float(rollbacks[0]["value"][1]) < 1.2


def test_the_namespace_filter_hides_other_tenants(prometheus: tuple[str, float]) -> None:
    expr = next(e for t, e in panels() if t == "Failures and errors by reason")
    reasons = {
        r["metric"]["reason"]: max(float(v) for _t, v in r["values"])
        for r in query_range(prometheus, expr)
    }
    assert reasons.get("OOMKilled", 0) > 0
    assert reasons.get("DataNotFound", 0) == 0  # a failure in namespace `other`
