"""API load of FineTuneJobs at rest: requests per second per pending, running and finished job.

Runs the real operator as its own process (``finetune-operator run -A``) against the embedded
API server and counts the requests the server receives (watch streams left out: they are
open connections, not requests per second) over a quiet window, one scenario at a time, each
with a fresh API server and operator:

- ``pending``: every trainer pod exists but no node fits it (``PodScheduled=False``,
  ``Unschedulable``), as in a cluster short of GPUs;
- ``running``: every trainer runs and prints a new progress line every
  ``--progress-seconds`` (the worst case: each poll finds new progress to write);
- ``finished``: every job has Succeeded.

``--baseline REF`` also runs the operator of git revision REF (extracted with `git archive`)
through the same scenarios, so that before and after come from one run on one machine.

    python bench/bench_ftj_load.py --pending 200 --running 50 --finished 100 --window 60
    python bench/bench_ftj_load.py --baseline main --table

Prints one JSON object; `--table` adds a side-by-side summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # the operator process, playing the cluster

REPO = bench_scale.REPO
SCENARIOS = ("pending", "running", "finished")


def progress_line(step: int) -> str:
    total = 10_000
    body = {
        "type": "progress", "step": step, "totalSteps": total, "epoch": step / total,
        "loss": round(2.0 - step / total, 4), "tokensPerSecond": 6800.0,
        "etaSeconds": (total - step) * 2, "gpuMemoryGiB": 10.1, "updatedAt": bench_scale._now(),
    }  # fmt: skip
    return "@@finetune " + json.dumps(body) + "\n"


def extract_operator(ref: str, folder: Path) -> Path:
    """The ``operator/`` folder of git revision ``ref``, unpacked under ``folder``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "operator"],
        capture_output=True,
        check=True,
    ).stdout
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / "operator.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")
    return folder / "operator"


# ---------------------------------------------------------------- playing the cluster


def create_pod(api: Any, ns: str, job: dict[str, Any], status: dict[str, Any]) -> str:
    """The Job controller's pod for ``job``, with the status the scheduler/kubelet gave it."""
    template = job["spec"]["template"]
    name = f"{job['metadata']['name']}-x1"
    api.create(
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": ns,
                      "labels": {**template["metadata"].get("labels", {}),
                                 "job-name": job["metadata"]["name"]},
                      "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                           "name": job["metadata"]["name"],
                                           "uid": job["metadata"]["uid"], "controller": True}]},
         "spec": template["spec"]},
        keep_status=False,
    )  # fmt: skip
    api.patch_status("pods", ns, name, status)
    return name


UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        }
    ],
}


def running_status() -> dict[str, Any]:
    now = bench_scale._now()
    return {
        "phase": "Running", "startTime": now,
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0,
                               "state": {"running": {"startedAt": now}}}],
    }  # fmt: skip


def _status(api: Any, key: tuple[str, str]) -> dict[str, Any]:
    return dict((api.read("finetunejobs", *key) or {}).get("status") or {})


def _training_reason(status: dict[str, Any]) -> str | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Training":
            return str(cond.get("reason"))
    return None


def at_rest(scenario: str, status: dict[str, Any]) -> bool:
    """Whether a job reached the state its scenario measures."""
    if scenario == "pending":
        return _training_reason(status) == "Unschedulable"
    if scenario == "running":
        return bool((status.get("progress") or {}).get("step"))
    return status.get("phase") == "Succeeded"


def bring_to_rest(
    api: Any, scenario: str, keys: list[tuple[str, str]], timeout: float
) -> list[tuple[str, str]]:
    """Create the jobs and play the cluster until every one is in the scenario's state;
    returns the trainer pods (namespace, name)."""
    for ns, name in keys:
        api.create(
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
             "metadata": {"name": name, "namespace": ns}, "spec": bench_scale.SPEC},
            keep_status=False,
        )  # fmt: skip
    pods: dict[tuple[str, str], tuple[str, str]] = {}  # key -> (pod, Job)
    done: set[tuple[str, str]] = set()
    finishing: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout
    while len(done) < len(keys):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{scenario}: {len(done)} of {len(keys)} jobs ready in time")
        for key in keys:
            if key in done:
                continue
            status = _status(api, key)
            job_name = status.get("trainerJob")
            if job_name and key not in pods:
                job = api.read("jobs", key[0], job_name)
                if job is None:
                    continue
                pod_status = UNSCHEDULABLE if scenario == "pending" else running_status()
                pods[key] = (create_pod(api, key[0], job, pod_status), job_name)
                if scenario != "pending":
                    api.set_pod_log(key[0], pods[key][0], progress_line(1), container="trainer")
            if key not in pods:
                continue
            if at_rest(scenario, status):
                done.add(key)
            elif scenario == "finished" and key not in finishing and status.get("progress"):
                finishing.add(key)  # it trained: the trainer exits, the Job completes
                bench_scale.finish_pod(api, key[0], *pods[key])
        time.sleep(0.1)
    return [(key[0], pod) for key, (pod, _job) in pods.items()]


def measure_window(
    api: Any, scenario: str, args: argparse.Namespace, pods: list[tuple[str, str]]
) -> dict[str, Any]:
    """Requests over ``--window`` seconds of rest (running trainers keep printing progress)."""
    time.sleep(args.settle)  # the last status writes' own events have come back
    api.reset_counters()
    started = time.monotonic()
    step = 1
    next_progress = started + args.progress_seconds
    end = started + args.window
    while time.monotonic() < end:
        if scenario == "running" and time.monotonic() >= next_progress:
            step += 1
            for ns, pod in pods:
                api.append_pod_log(ns, pod, progress_line(step), container="trainer")
            next_progress += args.progress_seconds
        time.sleep(0.05)
    seconds = time.monotonic() - started
    counts = {
        f"{verb} {resource}": n
        for (verb, resource), n in sorted(api.request_counts.items())
        if verb != "watch" and n
    }
    writes = sum(n for key, n in counts.items() if key.split()[0] in bench_scale.WRITE_VERBS)
    total = sum(counts.values())
    jobs = getattr(args, scenario)
    return {
        "jobs": jobs,
        "windowSeconds": round(seconds, 1),
        "requestsPerSecond": round(total / seconds, 2),
        "requestsPerSecondPerJob": round(total / seconds / jobs, 4),
        "readsPerSecondPerJob": round((total - writes) / seconds / jobs, 4),
        "writesPerSecondPerJob": round(writes / seconds / jobs, 4),
        "requests": counts,
    }


def run_scenario(
    scenario: str, args: argparse.Namespace, source: Path | None, folder: Path
) -> dict[str, Any]:
    from finetune_local import Emulator, serve

    api = Emulator()
    names = [f"team-{i:02d}" for i in range(args.namespaces)]
    count = getattr(args, scenario)
    keys = [(names[i % len(names)], f"{scenario}-{i:04d}") for i in range(count)]
    with serve(api) as server:
        for ns in names:
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for claim in ("models", "datasets", "adapters"):
                api.create(
                    {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": claim, "namespace": ns}, "spec": {}}
                )  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        with bench_scale.operator_process(
            str(server.url),
            args.poll_seconds,
            folder,
            polls_per_second=args.polls_per_second,
            operator_source=source,
        ):
            bench_scale._wait_watching(api)
            pods = bring_to_rest(api, scenario, keys, args.timeout)
            return measure_window(api, scenario, args, pods)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "pollSeconds": args.poll_seconds,
        "progressSeconds": args.progress_seconds,
        "namespaces": args.namespaces,
    }
    with tempfile.TemporaryDirectory(prefix="bench-ftj-load-") as tmp:
        variants: list[tuple[str, Path | None]] = [("after", None)]
        if args.baseline:
            variants.insert(0, ("before", extract_operator(args.baseline, Path(tmp) / "base")))
            out["baseline"] = args.baseline
        for label, source in variants:
            figures: dict[str, Any] = {}
            for scenario in SCENARIOS:
                if getattr(args, scenario) > 0:
                    folder = Path(tmp) / f"{label}-{scenario}"
                    figures[scenario] = run_scenario(scenario, args, source, folder)
            out[label] = figures
    return out


def print_table(out: dict[str, Any], write: Callable[[str], None] = print) -> None:
    labels = [label for label in ("before", "after") if label in out]
    write(f"{'requests/s per job':<28}" + "".join(f"{label:>14}" for label in labels))
    for scenario in SCENARIOS:
        for field in ("requestsPerSecondPerJob", "readsPerSecondPerJob", "writesPerSecondPerJob"):
            row = [out[label].get(scenario, {}).get(field) for label in labels]
            if all(value is None for value in row):
                continue
            name = f"{scenario} {field.removesuffix('PerSecondPerJob')}"
            write(f"{name:<28}" + "".join(f"{value!s:>14}" for value in row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pending", type=int, default=200, help="pending jobs (0: skip)")
    parser.add_argument("--running", type=int, default=50, help="running jobs (0: skip)")
    parser.add_argument("--finished", type=int, default=100, help="finished jobs (0: skip)")
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--window", type=float, default=60.0, help="seconds counted at rest")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before counting")
    parser.add_argument(
        "--poll-seconds", type=float, default=30.0, help="FINETUNE_PROGRESS_POLL_SECONDS"
    )
    parser.add_argument(
        "--polls-per-second", type=float, default=20.0, help="FINETUNE_PROGRESS_POLLS_PER_SECOND"
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=10.0,
        help="a running trainer prints a new progress line this often",
    )
    parser.add_argument("--baseline", default=None, help="git revision to compare against")
    parser.add_argument("--timeout", type=float, default=300.0, help="per scenario set-up")
    parser.add_argument("--table", action="store_true", help="also print a side-by-side table")
    args = parser.parse_args(argv)
    out = run(args)
    print(json.dumps(out))
    if args.table:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "operator"))
    sys.exit(main())
