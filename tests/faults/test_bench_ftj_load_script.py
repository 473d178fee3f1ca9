"""The API-load benchmark script still runs, and what it counts (not how fast) holds: pending
and finished jobs cost no request, a running job only its log read and the status writes that
carry its new progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs the benchmark script, the operator in a process of its own.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_bench_ftj_load_small_run() -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{REPO / 'trainer-image'}")
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(
        [sys.executable, "bench/bench_ftj_load.py", "--pending", "4", "--running", "3",
         "--finished", "3", "--namespaces", "2", "--window", "2", "--settle", "1",
         "--poll-seconds", "0.4", "--progress-seconds", "0.3", "--timeout", "60", "--table"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[0])["after"]
    assert figures["pending"]["requests"] == {}
    assert figures["finished"]["requests"] == {}
    running = figures["running"]
    assert set(running["requests"]) <= {"get pods/log", "patch finetunejobs/status"}
    # One log read per job and poll (0.4 s): about 2.5 a second; never the 4 requests a
    # poll used to cost. A machine under load polls less often, never more.
    assert 0 < running["readsPerSecondPerJob"] <= 1 / 0.4 * 1.2
    assert "requests/s per job" in out.stdout  # the table
