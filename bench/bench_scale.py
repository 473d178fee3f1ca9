"""Scale benchmark: many FineTuneJobs across many namespaces against the embedded API.

Runs the real operator (kopf, cluster-wide) against the emulated API server, creates N
FineTuneJobs spread over M namespaces at a given arrival rate, plays the cluster for each
trainer Job (its pod runs for ``--train-seconds``, then exits 0 with the trainer's result)
and reports:

- time from FineTuneJob creation until its trainer Job exists and status names it (p50/p99),
  and the throughput at which trainer Jobs appeared,
- operator requests and writes per job lifecycle (HTTP requests the API server answered),
- status writes that changed nothing,
- the operator process's own peak RSS (VmHWM) and CPU seconds,
- with ``--idle-seconds``: what the operator costs once every job has finished (requests a
  second, CPU, RSS, threads), and again after a restart over the same finished jobs,
- with ``--tracemalloc DIR`` as well: the restarted operator's memory at rest: what holds
  it per object (kopf's records and kept bodies, each index, the phase series) and Python's
  allocator figures (``heldAtRest``, also saved in DIR), and unless ``--tracemalloc-frames
  0``, a tracemalloc snapshot saved in DIR, its largest sources printed to stderr;
  ``--compare-snapshots A B`` prints what grew from snapshot A to snapshot B.

By default the operator runs as its own process (``finetune-operator run``, pointed at the
emulated API through a kubeconfig), as it would in a cluster; this process holds the API
server and the driver. ``--single-process`` runs all three in one interpreter instead (the
figures then include the API server and every object it stores).

    python bench/bench_scale.py --jobs 1000 --namespaces 50 --rate 10 --train-seconds 120
    python bench/bench_scale.py --jobs 1000 --namespaces 50 --rate 0     # all at once

Prints one JSON object; `--table` adds a human-readable summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

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
WRITE_VERBS = ("create", "update", "patch", "delete")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---------------------------------------------------------------- measuring a process


def proc_status_mib(pid: int | str, field: str) -> float:
    """A memory figure (VmRSS, VmHWM) of a process from /proc, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- playing the cluster


def start_pod(api: Any, ns: str, job: dict[str, Any]) -> str:
    """Job controller + kubelet: the trainer pod of ``job`` starts running."""
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
    now = _now()
    api.patch_status(
        "pods", ns, name,
        {"phase": "Running", "startTime": now,
         "conditions": [{"type": "PodScheduled", "status": "True"}],
         "containerStatuses": [{"name": container, "ready": True, "restartCount": 0,
                                "state": {"running": {"startedAt": now}}}]},
    )  # fmt: skip
    return name


def finish_pod(api: Any, ns: str, pod: str, job_name: str) -> None:
    """The trainer exits 0 with its result; the Job controller marks the Job Complete."""
    api.terminate_container(ns, pod, exit_code=0, message=json.dumps(RESULT), container="trainer")
    api.set_job_finished(ns, job_name, succeeded=True)


# ---------------------------------------------------------------- running the operator


def _kubeconfig(url: str, folder: Path) -> Path:
    path = folder / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulated", "cluster": {"server": url}}],
                "users": [{"name": "bench", "user": {"token": "bench"}}],
                "contexts": [
                    {"name": "emulated", "context": {"cluster": "emulated", "user": "bench"}}
                ],
                "current-context": "emulated",
            }
        )
    )
    return path


@contextlib.contextmanager
def operator_process(
    url: str,
    poll_seconds: float,
    folder: Path,
    log_path: Path | None = None,
    polls_per_second: float = 20.0,
    operator_source: Path | None = None,
    snapshot_path: Path | None = None,
    snapshot_frames: int = 1,
) -> Iterator[int]:
    """``finetune-operator run -A`` as its own process; yields its pid once it watches.

    ``operator_source``: the folder holding the ``finetune_operator`` package to run (another
    version's, to compare); this tree's by default. ``snapshot_path``: run it under
    tracemalloc (``snapshot_frames`` frames a trace), saving a snapshot there when asked
    (:func:`take_snapshot`).
    """
    env = dict(
        os.environ,
        KUBECONFIG=str(_kubeconfig(url, folder)),
        PYTHONPATH=f"{operator_source or REPO / 'operator'}:{REPO / 'trainer-image'}",
        FINETUNE_METRICS_PORT="0",
        FINETUNE_PROGRESS_POLL_SECONDS=str(poll_seconds),
        FINETUNE_PROGRESS_POLLS_PER_SECOND=str(polls_per_second),
    )
    command = [sys.executable, "-m", "finetune_operator.cli"]
    if snapshot_path is not None:
        env["FINETUNE_BENCH_SNAPSHOT"] = str(snapshot_path)
        tracing = ["-X", f"tracemalloc={snapshot_frames}"] if snapshot_frames > 0 else []
        command = [sys.executable, *tracing, str(TRACED_OPERATOR)]
    with open(log_path or folder / "operator.log", "w") as log:
        proc = subprocess.Popen(
            [*command, "run", "--all-namespaces"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The operator under tracemalloc: SIGUSR1 makes it save a snapshot and what holds its
# memory (see that script), then touch "<snapshot>.done".
TRACED_OPERATOR = REPO / "bench" / "traced_operator.py"
# How many allocation sources a snapshot report lists.
SNAPSHOT_TOP = 25


def take_snapshot(pid: int, path: Path, timeout: float = 120.0) -> Path:
    """Ask the operator run by ``TRACED_OPERATOR`` for its figures (and snapshot, if traced),
    and wait for them."""
    done = Path(f"{path}.done")
    for stale in (done, path, Path(f"{path}.json")):  # left by an earlier run
        stale.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the operator did not save its tracemalloc snapshot in time")
        time.sleep(0.2)
    return path


def _own_traces(snapshot: Any) -> Any:
    import tracemalloc

    return snapshot.filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        )
    )


def _group(snapshot: Any) -> str:
    """By line with one frame a trace, else by whole traceback (where it was allocated from)."""
    return "traceback" if snapshot.traceback_limit > 1 else "lineno"


def _where(traceback: Any) -> str:
    """A traceback on one line, innermost frame first (paths shortened to the package)."""
    frames = []
    for frame in list(reversed(traceback))[:8]:
        parts = Path(frame.filename).parts
        short = "/".join(parts[-2:]) if len(parts) > 1 else frame.filename
        frames.append(f"{short}:{frame.lineno}")
    return " < ".join(frames)


def snapshot_report(path: Path, top: int = SNAPSHOT_TOP) -> list[str]:
    """The largest allocation sources of one snapshot."""
    import tracemalloc

    snapshot = _own_traces(tracemalloc.Snapshot.load(str(path)))
    stats = snapshot.statistics(_group(snapshot))
    total = sum(stat.size for stat in stats)
    lines = [f"{path}: {total / 1024:.0f} KiB in {sum(s.count for s in stats)} blocks"]
    lines += [f"{s.size / 1024:10.1f} KiB {s.count:8d}  {_where(s.traceback)}" for s in stats[:top]]
    return lines


def snapshot_diff(before: Path, after: Path, top: int = SNAPSHOT_TOP) -> list[str]:
    """What grew from snapshot ``before`` to ``after``, largest first."""
    import tracemalloc

    old = _own_traces(tracemalloc.Snapshot.load(str(before)))
    new = _own_traces(tracemalloc.Snapshot.load(str(after)))
    diff = new.compare_to(old, _group(new))
    grown = sum(d.size_diff for d in diff)
    lines = [f"{before} -> {after}: {grown / 1024:+.0f} KiB"]
    lines += [
        f"{d.size_diff / 1024:+10.1f} KiB {d.count_diff:+8d}  {_where(d.traceback)}"
        for d in diff[:top]
    ]
    return lines


def _wait_watching(api: Any, timeout: float = 180.0) -> None:
    """Until the operator opened its watches (FineTuneJobs and Jobs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.count(verb="watch", resource="finetunejobs") and api.count(
            verb="watch", resource="jobs"
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("the operator did not start watching in time")


# ---------------------------------------------------------------- the benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    from finetune_local import Emulator, serve

    api = Emulator()
    names = [f"team-{i:02d}" for i in range(args.namespaces)]
    with serve(api) as server, tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for ns in names:
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for claim in ("models", "datasets", "adapters"):
                api.create(
                    {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": claim, "namespace": ns}, "spec": {}}
                )  # fmt: skip
        api.reset_counters()
        with _operator(args, server.url, Path(tmp)) as pid:
            _wait_watching(api)
            cpu_before = proc_cpu_seconds(pid)
            own_cpu_before = proc_cpu_seconds("self")
            rss_idle = proc_status_mib(pid, "VmRSS")
            figures = drive(api, names, args, pid)
            figures["operatorCpuSeconds"] = round(proc_cpu_seconds(pid) - cpu_before, 1)
            # This process: the API server and the driver (the operator too if single-process).
            figures["apiServerAndDriverCpuSeconds"] = round(
                proc_cpu_seconds("self") - own_cpu_before, 1
            )
            figures["operatorRssIdleMiB"] = round(rss_idle, 1)
            figures["operatorPeakRssMiB"] = round(proc_status_mib(pid, "VmHWM"), 1)
            log_path = Path(args.operator_log or Path(tmp) / "operator.log")
            if log_path.exists():
                figures["operatorLogLinesPerJob"] = round(
                    len(log_path.read_text().splitlines()) / args.jobs, 1
                )
            if args.idle_seconds > 0:
                figures["idleAfterRun"] = idle_window(api, pid, args.idle_seconds)
        if args.idle_seconds > 0:
            # A fresh operator over the same finished jobs: what kopf starts for each on resume.
            restart = Path(tmp) / "restart"
            restart.mkdir()
            api.reset_counters()
            snapshot = _snapshot_path(args)
            with _operator(args, server.url, restart, snapshot) as pid:
                _wait_watching(api)
                _settle(api)
                figures["idleAfterRestart"] = {
                    "startupRequests": api.count(),
                    **idle_window(api, pid, args.idle_seconds),
                }
                if snapshot is not None:
                    take_snapshot(pid, snapshot)
                    figures["idleAfterRestart"]["heldAtRest"] = json.loads(
                        Path(f"{snapshot}.json").read_text()
                    )
                    if snapshot.exists():  # traced (--tracemalloc-frames above 0)
                        figures["idleAfterRestart"]["tracemallocSnapshot"] = str(snapshot)
                        print("\n".join(snapshot_report(snapshot)), file=sys.stderr)
    figures["operatorCpuCoresAverage"] = round(
        figures["operatorCpuSeconds"] / figures["wallSeconds"], 2
    )
    return figures


def _settle(api: Any, quiet_seconds: float = 2.0, timeout: float = 60.0) -> None:
    """Until the API server has seen no request for ``quiet_seconds``."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline and api.count() != last:
        last = api.count()
        time.sleep(quiet_seconds)


def idle_window(api: Any, pid: int, seconds: float) -> dict[str, Any]:
    """What the operator costs while every job is finished: requests, CPU and memory."""
    _settle(api)
    requests, cpu = api.count(), proc_cpu_seconds(pid)
    time.sleep(seconds)
    by_kind = {
        f"{verb} {res}": n
        for (verb, res), n in sorted(dict(api.request_counts).items(), key=lambda kv: -kv[1])
    }
    return {
        "seconds": seconds,
        "requestsPerSecond": round((api.count() - requests) / seconds, 3),
        "requestsSoFarByVerbAndResource": by_kind,
        "operatorCpuSeconds": round(proc_cpu_seconds(pid) - cpu, 2),
        "operatorRssMiB": round(proc_status_mib(pid, "VmRSS"), 1),
        "operatorThreads": _threads(pid),
    }


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def _snapshot_path(args: argparse.Namespace) -> Path | None:
    """Where the restarted operator's snapshot goes (named by the job count), if traced."""
    if not args.tracemalloc:
        return None
    folder = Path(args.tracemalloc)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"restart-{args.jobs}.snapshot"


@contextlib.contextmanager
def _operator(
    args: argparse.Namespace, url: str, folder: Path, snapshot: Path | None = None
) -> Iterator[int]:
    if not args.single_process:
        log_path = Path(args.operator_log) if args.operator_log else None
        source = Path(args.operator_source) if args.operator_source else None
        with operator_process(
            url,
            args.poll_seconds,
            folder,
            log_path,
            args.polls_per_second,
            source,
            snapshot,
            args.tracemalloc_frames,
        ) as pid:
            yield pid
        return
    import finetune_operator.main  # noqa: F401  (registers the handlers)
    import kopf
    from finetune_local import run_operator
    from finetune_operator.clients.kube import KubeClient
    from finetune_operator.config import OperatorConfig

    config = OperatorConfig(
        metrics_port=0,
        progress_poll_seconds=args.poll_seconds,
        progress_polls_per_second=args.polls_per_second,
    )
    memo = kopf.Memo(config=config, kube=KubeClient.from_url(url))
    with run_operator(url, memo=memo, clusterwide=True, startup_timeout=60, stop_timeout=60):
        yield os.getpid()


def drive(api: Any, names: list[str], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """Create the jobs at the arrival rate, play their pods, follow their status."""
    jobs = args.jobs
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    created: dict[tuple[str, str], float] = {}
    job_seen: dict[tuple[str, str], float] = {}
    running: dict[tuple[str, str], tuple[float, str, str]] = {}  # key -> (ends at, pod, job)
    done: dict[tuple[str, str], float] = {}
    live_peak = 0
    rss_all_live = float("nan")
    seen_writes = 0
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    while len(done) < jobs and time.monotonic() < deadline:
        now = time.monotonic()
        # Arrivals due by now (all at once when the rate is 0).
        while len(created) < jobs and (interval == 0 or t0 + len(created) * interval <= now):
            i = len(created)
            ns, name = names[i % len(names)], f"job-{i:04d}"
            api.create(
                {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                 "metadata": {"name": name, "namespace": ns}, "spec": SPEC},
                keep_status=False,
            )  # fmt: skip
            created[(ns, name)] = time.monotonic()
        # Follow the write log instead of re-reading every object each round: the driver
        # must not eat the CPU the operator is being measured on.
        fresh = api.writes[seen_writes:]
        seen_writes += len(fresh)
        for w in fresh:
            if w.plural != "finetunejobs" or w.subresource != "status":
                continue
            key = (w.namespace or "", w.name)
            if key not in created or key in done:
                continue
            st = (api.read("finetunejobs", *key) or {}).get("status") or {}
            if st.get("trainerJob") and key not in job_seen:
                # The Job is created before the status naming it is written.
                job = api.read("jobs", key[0], st["trainerJob"])
                if job is not None:
                    job_seen[key] = now
                    pod = start_pod(api, key[0], job)
                    running[key] = (now + args.train_seconds, pod, st["trainerJob"])
            if st.get("phase") in ("Succeeded", "Failed"):
                done[key] = now
        for key, (ends, pod, job_name) in list(running.items()):
            if ends <= now:
                finish_pod(api, key[0], pod, job_name)
                del running[key]
        live = len(created) - len(done)
        if live >= live_peak:
            live_peak = live
            if live == jobs:
                rss_all_live = proc_status_mib(pid, "VmRSS")
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    # Events follow the status write that the driver saw: let the last ones land.
    settle_until, last_count = time.monotonic() + 10, -1
    while time.monotonic() < settle_until and api.count() != last_count:
        last_count = api.count()
        time.sleep(1.0)
    to_job = [job_seen[k] - created[k] for k in job_seen]
    last_job = max(job_seen.values(), default=t0) - t0
    writes = sum(api.count(verb=v) for v in WRITE_VERBS)
    events = api.count(verb="create", resource="events")
    status_writes = sum(
        api.count(verb=v, resource="finetunejobs/status") for v in ("patch", "update")
    )
    succeeded = sum(
        1 for k in done
        if ((api.read("finetunejobs", *k) or {}).get("status") or {}).get("phase") == "Succeeded"
    )  # fmt: skip
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "mode": "single-process" if args.single_process else "operator-process",
        "switchIntervalSeconds": sys.getswitchinterval(),
        "jobs": jobs,
        "namespaces": len(names),
        "ratePerSecond": args.rate,
        "trainSeconds": args.train_seconds,
        "pollSeconds": args.poll_seconds,
        "pollsPerSecondBudget": args.polls_per_second,
        "trainerJobsCreated": len(job_seen),
        "succeeded": succeeded,
        "wallSeconds": round(elapsed, 1),
        "createToJobP50s": round(statistics.median(to_job), 3) if to_job else None,
        "createToJobP99s": round(percentile(to_job, 99), 3) if to_job else None,
        "createToJobMaxS": round(max(to_job), 3) if to_job else None,
        "jobsPerSecondToLastJob": round(len(job_seen) / last_job, 1) if last_job > 0 else None,
        "liveJobsPeak": live_peak,
        "operatorRequestsPerJob": round(api.count() / jobs, 2),
        "operatorWritesPerJob": round(writes / jobs, 2),
        "eventsPerJob": round(events / jobs, 2),
        "statusWritesPerJob": round(status_writes / jobs, 2),
        "noopStatusWrites": api.noop_status_writes,
        "requestsPerJobByVerbAndResource": {
            f"{verb} {res}": round(n / jobs, 2)
            for (verb, res), n in sorted(api.request_counts.items(), key=lambda kv: -kv[1])
        },
        "operatorRssAllLiveMiB": round(rss_all_live, 1),
        "benchProcessMaxRssMiB": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument(
        "--rate", type=float, default=10.0, help="FineTuneJobs created per second (0: all at once)"
    )
    parser.add_argument(
        "--train-seconds", type=float, default=0.0, help="how long each trainer pod runs"
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=15.0,
        help="FINETUNE_PROGRESS_POLL_SECONDS of the operator (its default: 30)",
    )
    parser.add_argument(
        "--polls-per-second",
        type=float,
        default=20.0,
        help="FINETUNE_PROGRESS_POLLS_PER_SECOND of the operator (its default: 20)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--single-process",
        action="store_true",
        help="run the operator in this process too (figures include the API server)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        help="sys.setswitchinterval for this process (0: keep Python's 5 ms default)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=0.0,
        help="once all jobs finished: measure the idle operator this long, then again after "
        "a restart over the same finished jobs (0: skip)",
    )
    parser.add_argument("--operator-log", default=None, help="keep the operator's log here")
    parser.add_argument(
        "--operator-source",
        default=None,
        help="folder holding the finetune_operator package to run (another version's)",
    )
    parser.add_argument(
        "--tracemalloc",
        default=None,
        metavar="DIR",
        help="with --idle-seconds: measure what holds the restarted operator's memory at rest "
        "(heldAtRest; DIR/restart-<jobs>.snapshot.json) and save its tracemalloc snapshot in "
        "DIR (restart-<jobs>.snapshot); traced, its figures include tracemalloc's own memory",
    )
    parser.add_argument(
        "--tracemalloc-frames",
        type=int,
        default=1,
        help="frames kept of each allocation's traceback (more: slower, and reports group "
        "by whole tracebacks; 0: no tracing, only what holds memory and the allocator's "
        "figures, with the RSS of an untraced process)",
    )
    parser.add_argument(
        "--compare-snapshots",
        nargs=2,
        default=None,
        metavar=("BEFORE", "AFTER"),
        help="print what grew from snapshot BEFORE to AFTER (by file and line) and exit",
    )
    parser.add_argument("--table", action="store_true", help="also print a readable summary")
    args = parser.parse_args(argv)
    if args.compare_snapshots:
        before, after = (Path(p) for p in args.compare_snapshots)
        print("\n".join(snapshot_report(after) + snapshot_diff(before, after)))
        return 0
    if args.tracemalloc and (args.single_process or args.idle_seconds <= 0):
        parser.error("--tracemalloc needs --idle-seconds and the operator in its own process")
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    out = run(args)
    print(json.dumps(out))
    if args.table:
        for key, value in out.items():
            print(f"{key:>28}: {value}")
    return 0 if out["succeeded"] == args.jobs else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "operator"))
    sys.exit(main())
