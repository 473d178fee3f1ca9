"""The scale benchmark script still runs, and what it counts (not how fast) holds: every job
succeeds with one trainer Job, no status write changes nothing, and a lifecycle stays within
its write budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_scale_small_run() -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{REPO / 'trainer-image'}")
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(
        [sys.executable, "bench/bench_scale.py", "--jobs", "12", "--namespaces", "3",
         "--timeout", "60"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["trainerJobsCreated"] == 12 and figures["succeeded"] == 12
    assert figures["noopStatusWrites"] == 0
    assert figures["statusWritesPerJob"] <= 3
    assert figures["operatorWritesPerJob"] <= 16  # events included (one per condition change)
