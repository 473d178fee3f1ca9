"""Scale benchmark: many FineTuneJobs across many namespaces against the embedded API.

Runs the real operator (kopf, cluster-wide) against the emulated API server in this process,
creates N FineTuneJobs spread over M namespaces, plays the cluster for each trainer Job (pod
runs, trainer reports its result through the termination message) and reports:

- time from FineTuneJob creation until its trainer Job exists and status names it (p50/p99),
- time from creation to Succeeded,
- operator requests and writes per job lifecycle (HTTP requests the operator made),
- status writes that changed nothing,
- peak RSS of this process (operator + embedded API + the objects it stores) and the growth
  from before the operator started.

    python bench/bench_scale.py --jobs 1000 --namespaces 50

Prints one JSON object; `--table` adds a human-readable summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEC: dict[str, Any] = {
    "baseModel": {"uri": "pvc://models/llama-3-8b"},
    "dataset": {"train": {"uri": "pvc://datasets/support/train.jsonl"}},
    "method": "qlora",
    "lora": {"r": 16},
    "training": {"maxSeqLength": 2048, "batchSize": 4, "gradientCheckpointing": True},
    "resources": {"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
    "output": {"uri": "pvc://adapters/out"},
    "qualityGates": [{"metric": "evalLoss", "max": 2.0}],
}
RESULT = {
    "type": "result",
    "ok": True,
    "metrics": {"evalLoss": 1.1},
    "adapter": {
        "uri": "/mnt/pvc/adapters/out/adapter",
        "digest": "sha256:" + "b" * 64,
        "rank": 16,
        "sizeBytes": 42_000_000,
        "baseModel": "pvc://models/llama-3-8b",
        "method": "qlora",
    },
}


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def play_pod(api: Any, ns: str, job: dict[str, Any]) -> None:
    """Job controller + kubelet: the trainer pod runs and exits 0 with its result."""
    template = job["spec"]["template"]
    name = f"{job['metadata']['name']}-x1"
    container = template["spec"]["containers"][0]["name"]
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    **template["metadata"].get("labels", {}),
                    "job-name": job["metadata"]["name"],
                },
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job["metadata"]["name"],
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
        },
        keep_status=False,
    )
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    api.patch_status(
        "pods", ns, name,
        {
            "phase": "Succeeded",
            "startTime": now,
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {"name": container, "ready": False, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now,
                                          "finishedAt": now, "message": json.dumps(RESULT)}}}
            ],
        },
    )  # fmt: skip
    api.set_job_finished(ns, job["metadata"]["name"], succeeded=True)


def run(jobs: int, namespaces: int, timeout: float) -> dict[str, Any]:
    import finetune_operator.main  # noqa: F401  (registers the handlers)
    import kopf
    from finetune_operator.clients.kube import KubeClient
    from finetune_operator.config import OperatorConfig
    from finetune_operator.local import Emulator, run_operator, serve

    api = Emulator()
    names = [f"team-{i:02d}" for i in range(namespaces)]
    with serve(api):
        for ns in names:
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for claim in ("models", "datasets", "adapters"):
                api.create(
                    {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": claim, "namespace": ns}, "spec": {}}
                )  # fmt: skip
        config = OperatorConfig(metrics_port=0, progress_poll_seconds=2.0)
        memo = kopf.Memo(config=config, kube=KubeClient.from_url(str(api.url)))
        rss_before = rss_mib()
        api.reset_counters()
        with run_operator(api, memo=memo, clusterwide=True, startup_timeout=60, stop_timeout=60):
            created: dict[tuple[str, str], float] = {}
            job_seen: dict[tuple[str, str], float] = {}
            done: dict[tuple[str, str], float] = {}
            played: set[tuple[str, str]] = set()
            peak = rss_mib()
            t0 = time.monotonic()
            for i in range(jobs):
                ns = names[i % namespaces]
                name = f"job-{i:04d}"
                api.create(
                    {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                     "metadata": {"name": name, "namespace": ns}, "spec": SPEC},
                    keep_status=False,
                )  # fmt: skip
                created[(ns, name)] = time.monotonic()
            deadline = time.monotonic() + timeout
            seen_writes = 0
            while len(done) < jobs and time.monotonic() < deadline:
                now = time.monotonic()
                # Follow the write log instead of re-reading every object each round: the
                # driver must not eat the CPU the operator is being measured on.
                fresh = api.writes[seen_writes:]
                seen_writes += len(fresh)
                for w in fresh:
                    if w.plural != "finetunejobs" or w.subresource != "status":
                        continue
                    key = (w.namespace or "", w.name)
                    if key not in created or key in done:
                        continue
                    st = (api.read("finetunejobs", *key) or {}).get("status") or {}
                    if st.get("trainerJob") and key not in played:
                        # The Job is created before the status naming it is written.
                        job = api.read("jobs", key[0], st["trainerJob"])
                        if job is not None:
                            job_seen[key] = now
                            played.add(key)
                            play_pod(api, key[0], job)
                    if st.get("phase") in ("Succeeded", "Failed"):
                        done[key] = now
                peak = max(peak, rss_mib())
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            to_job = [job_seen[k] - created[k] for k in job_seen]
            to_done = [done[k] - created[k] for k in done]
            operator_requests = api.count()
            writes = sum(api.count(verb=v) for v in ("create", "update", "patch", "delete"))
            status_writes = sum(api.count(verb=v, resource=r) for v in ("patch", "update")
                                for r in ("finetunejobs/status",))  # fmt: skip
            noop_status = api.noop_status_writes
            succeeded = sum(
                1 for k in done
                if ((api.read("finetunejobs", *k) or {}).get("status") or {}).get("phase") == "Succeeded"
            )  # fmt: skip
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "switchIntervalSeconds": sys.getswitchinterval(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "jobs": jobs,
        "namespaces": namespaces,
        "trainerJobsCreated": len(job_seen),
        "succeeded": succeeded,
        "wallSeconds": round(elapsed, 1),
        "createToJobP50s": round(statistics.median(to_job), 3) if to_job else None,
        "createToJobP99s": round(percentile(to_job, 99), 3) if to_job else None,
        "createToSucceededP50s": round(statistics.median(to_done), 3) if to_done else None,
        "createToSucceededP99s": round(percentile(to_done, 99), 3) if to_done else None,
        "operatorRequestsPerJob": round(operator_requests / jobs, 2),
        "operatorWritesPerJob": round(writes / jobs, 2),
        "statusWritesPerJob": round(status_writes / jobs, 2),
        "noopStatusWrites": noop_status,
        "rssBeforeOperatorMiB": round(rss_before, 1),
        "rssPeakMiB": round(peak, 1),
        "maxRssMiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="give up after this many seconds"
    )
    parser.add_argument("--table", action="store_true", help="also print a readable summary")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0005,
        help="sys.setswitchinterval for this process (0: keep Python's 5 ms default)",
    )
    args = parser.parse_args(argv)
    # The operator, the API server and this driver share one interpreter here (never in a
    # cluster). With Python's 5 ms GIL switch interval every request hop between their
    # threads can wait for a switch, which measured the harness rather than the operator.
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    out = run(args.jobs, args.namespaces, args.timeout)
    print(json.dumps(out))
    if args.table:
        for key, value in out.items():
            print(f"{key:>24}: {value}")
    return 0 if out["succeeded"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
