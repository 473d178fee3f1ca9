"""Start-up benchmark: time from starting ``finetune-operator run`` to its first reconcile.

The operator runs as its own process against the embedded API server (pointed at it through a
kubeconfig), with one FineTuneJob waiting in namespace ``team-a``. Three runs:

- ``cluster-wide``: ``run --all-namespaces`` with the ClusterRole's access;
- ``namespaced``: ``run -n team-a`` with what the namespaced install grants (Roles only): the
  API server answers 403 to cluster-wide namespace and CRD listings and watches;
- ``namespaced-kopf-scanning`` (``--with-scanning``): the same with kopf's default scanning
  left on, as the operator ran before it turned scanning off for exact namespaces.

Reports, per run, seconds from process start until the operator watches FineTuneJobs, until
the job's first status write (first reconcile), and the refused cluster-wide requests.

    python bench/bench_startup.py --runs 3 [--with-scanning]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import REPO, SPEC, _kubeconfig

NAMESPACE = "team-a"
CLUSTER_WIDE = (
    ("namespaces", "list"),
    ("namespaces", "watch"),
    ("customresourcedefinitions", "list"),
    ("customresourcedefinitions", "watch"),
)
# The operator as it was started before: kopf's default settings, scanning on.
WITH_SCANNING = (
    "import kopf, sys; import finetune_operator.cli as cli; "
    "cli.operator_settings = lambda namespaces: kopf.OperatorSettings(); "
    "sys.exit(cli.main(sys.argv[1:]))"
)


def prepare(api: Any, namespaced: bool) -> None:
    from finetune_local.resources import ResourceType

    api.add_resource(
        ResourceType(
            "apiextensions.k8s.io", "v1", "customresourcedefinitions",
            "CustomResourceDefinition", namespaced=False,
        )
    )  # fmt: skip
    if namespaced:  # the namespaced install grants nothing cluster-wide
        for resource, verb in CLUSTER_WIDE:
            api.inject_fault(resource, 403, count=10**6, verbs=(verb,), message="forbidden")
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    for claim in ("models", "datasets", "adapters"):
        api.create(
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": claim, "namespace": NAMESPACE}, "spec": {}}
        )  # fmt: skip
    api.create(
        {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
         "metadata": {"name": "first", "namespace": NAMESPACE}, "spec": SPEC},
        keep_status=False,
    )  # fmt: skip


def first_status_write(api: Any) -> bool:
    return any(
        w.plural == "finetunejobs" and w.subresource == "status" and w.name == "first"
        for w in api.writes
    )


def one_run(mode: str, timeout: float) -> dict[str, Any]:
    from finetune_local import Emulator, serve

    api = Emulator()
    namespaced = mode != "cluster-wide"
    prepare(api, namespaced)
    scope = ["--namespace", NAMESPACE] if namespaced else ["--all-namespaces"]
    entry = (
        ["-c", WITH_SCANNING]
        if mode == "namespaced-kopf-scanning"
        else ["-m", "finetune_operator.cli"]
    )
    with serve(api) as server, tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        env = dict(
            os.environ,
            KUBECONFIG=str(_kubeconfig(server.url, Path(tmp))),
            PYTHONPATH=f"{REPO / 'operator'}:{REPO / 'trainer-image'}",
            FINETUNE_METRICS_PORT="0",
        )
        api.reset_counters()
        started = time.monotonic()
        with open(Path(tmp) / "operator.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, *entry, "run", "--standalone", *scope],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        watching = reconciled = float("nan")
        try:
            while time.monotonic() - started < timeout:
                now = time.monotonic() - started
                if watching != watching and api.count(verb="watch", resource="finetunejobs"):
                    watching = now
                if first_status_write(api):
                    reconciled = now
                    break
                time.sleep(0.02)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        refused = {
            f"{verb} {resource}": api.count(verb=verb, resource=resource)
            for resource, verb in CLUSTER_WIDE
            if namespaced and api.count(verb=verb, resource=resource)
        }
    return {"watchingSeconds": round(watching, 2), "firstReconcileSeconds": round(reconciled, 2),
            "refusedRequests": refused}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (median reported)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most")
    parser.add_argument(
        "--with-scanning", action="store_true", help="also run with kopf's default scanning"
    )
    args = parser.parse_args(argv)
    modes = ["cluster-wide", "namespaced"] + (
        ["namespaced-kopf-scanning"] if args.with_scanning else []
    )
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "python": platform.python_version(),
        "runs": args.runs,
    }
    for mode in modes:
        runs = [
            one_run(mode, args.timeout)
            for _ in range(args.runs if mode != "namespaced-kopf-scanning" else 1)
        ]
        report[mode] = {
            "watchingSeconds": statistics.median(r["watchingSeconds"] for r in runs),
            "firstReconcileSeconds": statistics.median(r["firstReconcileSeconds"] for r in runs),
            "firstReconcileSecondsEachRun": [r["firstReconcileSeconds"] for r in runs],
            "refusedRequests": runs[-1]["refusedRequests"],
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
