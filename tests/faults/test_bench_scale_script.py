"""The scale benchmark script still runs, and what it counts (not how fast) holds: every job
succeeds with one trainer Job, no status write changes nothing, a lifecycle stays within its
write budget, and the operator's own process is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Runs the benchmark script, the operator in a process of its own.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run_bench_scale(*args: str, timeout: float) -> dict[str, Any]:
    """Run bench/bench_scale.py with these arguments; its figures (the last output line)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{REPO / 'trainer-image'}")
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(
        [sys.executable, "bench/bench_scale.py", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def test_bench_scale_small_run_with_the_operator_in_its_own_process() -> None:
    figures = run_bench_scale(
        "--jobs", "12", "--namespaces", "3", "--rate", "20", "--train-seconds", "1",
        "--poll-seconds", "0.3", "--timeout", "90", timeout=180,
    )  # fmt: skip
    assert figures["mode"] == "operator-process"
    assert figures["trainerJobsCreated"] == 12 and figures["succeeded"] == 12
    assert figures["noopStatusWrites"] == 0
    # Pending, Training, Succeeded (sometimes the moment between the container's exit and
    # the Job's completion is seen too); polls in between write nothing new.
    assert figures["statusWritesPerJob"] <= 4
    # JobCreated, Running, Succeeded (decision 1201).
    assert figures["eventsPerJob"] <= 3
    # ConfigMap, Job, kopf's finalizer and annotation, 3-4 status writes, 3 events.
    assert figures["operatorWritesPerJob"] <= 11
    # The operator process was found and measured (its own figures, not this process's).
    assert figures["operatorPeakRssMiB"] > 20 and figures["operatorCpuSeconds"] > 0


def test_bench_scale_measures_the_idle_operator_and_a_restart_over_finished_jobs() -> None:
    figures = run_bench_scale(
        "--jobs", "6", "--namespaces", "2", "--rate", "0", "--train-seconds", "1",
        "--idle-seconds", "1", "--timeout", "90", timeout=240,
    )  # fmt: skip
    assert figures["succeeded"] == 6
    for window in ("idleAfterRun", "idleAfterRestart"):
        idle = figures[window]
        assert idle["seconds"] == 1 and idle["requestsPerSecond"] >= 0
        assert idle["operatorRssMiB"] > 20 and idle["operatorThreads"] >= 1
    # The restarted operator lists and watches; it reads no finished job again (decision 2080).
    restart = figures["idleAfterRestart"]
    by_kind = restart["requestsSoFarByVerbAndResource"]
    assert by_kind["watch finetunejobs"] >= 1 and "get finetunejobs" not in by_kind


def test_bench_scale_says_what_holds_the_restarted_operators_memory(tmp_path: Path) -> None:
    figures = run_bench_scale(
        "--jobs", "4", "--namespaces", "2", "--rate", "0", "--train-seconds", "1",
        "--idle-seconds", "1", "--timeout", "90", "--tracemalloc", str(tmp_path),
        "--tracemalloc-frames", "0", timeout=240,
    )  # fmt: skip
    held = figures["idleAfterRestart"]["heldAtRest"]
    assert held == json.loads((tmp_path / "restart-4.snapshot.json").read_text())
    assert held["rssKiB"] > 20 * 1024 and held["allocator"]["liveBlockBytes"] > 0
    holders = held["holders"]
    # kopf keeps a record of each object it saw, and the body of each finished job (the
    # FineTuneJob kind has daemons); the indexes name each job's trainer Job and pod.
    assert holders["kopfObjectRecords"] >= 4 and holders["kopfBodiesKept"] == 4
    assert holders["indexes"]["ftj_trainer_jobs"]["keys"] == 4
    assert holders["phaseSeries"] >= 4
    # Untraced (frames 0): no tracemalloc snapshot.
    assert "tracemallocSnapshot" not in figures["idleAfterRestart"]
    assert not (tmp_path / "restart-4.snapshot").exists()
