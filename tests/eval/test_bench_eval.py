"""The evaluation benchmark still runs (CPU smoke check; it measures nothing here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_eval_tiny_smoke() -> None:
    args = ["--tiny", "--prompts", "3", "--batch-size", "2", "--max-new-tokens", "3"]
    args += ["--latency-requests", "1"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_eval.py"), *args, "--warmup-batches", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["device"] == "cpu" and report["quant"] == "nf4"
    assert report["quantizedLinearLayers"] == 14  # 7 projections x 2 layers, head excluded
    # One request alone (timed), then the other two in one batch.
    assert report["prompts"] == 3 and report["batches"] == 2 and report["latencyRequests"] == 1
    assert report["generatedTokens"] <= 9
    assert report["latencyP50Ms"] > 0 and report["tokensPerSecond"] > 0


@pytest.mark.slow  # the benchmark script in its own process
def test_full_size_bench_refuses_cpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_eval.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "needs CUDA" in proc.stderr
