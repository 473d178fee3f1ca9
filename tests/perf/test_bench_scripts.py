"""The benchmark scripts stay runnable: --help, the VRAM matrix builds valid trainer configs,
and the stored H100 results parse into the comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import bench_vram  # noqa: E402


@pytest.mark.parametrize("script", ["bench_train.py", "bench_vram.py", "data.py"])
def test_help_works_without_a_gpu(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={
            "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer-image'}",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout


def test_vram_matrix_spans_the_required_space(tmp_path: Path) -> None:
    matrix = bench_vram.DEFAULT_MATRIX
    assert len(matrix) >= 8
    assert {c["shape"] for c in matrix} >= {
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "llama3-8b",
    }
    assert {c["method"] for c in matrix} == {"lora", "qlora"}
    assert {c["gc"] for c in matrix} == {True, False}
    assert len({c["seq"] for c in matrix}) >= 2
    for cfg in matrix:
        config = bench_vram.trainer_config(cfg, str(tmp_path), str(tmp_path / "out"))
        assert config.spec.training.batch_size == cfg["batch"]
        assert config.spec.method == cfg["method"]


def test_stored_results_are_complete() -> None:
    train = json.loads((REPO / "bench/results/h100-train-2026-11-23.json").read_text())
    names = [r["variant"] for r in train["results"]]
    assert names[0] == "baseline"
    assert all("error" not in r for r in train["results"])
    assert train["equivalence"]["maxRelativeDifference"] <= 0.02
    vram = json.loads((REPO / "bench/results/h100-vram-from-train-2026-11-23.json").read_text())
    assert len(vram["results"]) == 5


def test_stored_fast_path_run_is_complete_and_side_by_side() -> None:
    """The run docs/benchmarks.md quotes: baseline and fast path in one invocation."""
    train = json.loads((REPO / "bench/results/h100-2026-11-23/train.json").read_text())
    results = {r["variant"]: r for r in train["results"]}
    assert train["results"][0]["variant"] == "baseline"
    assert all("error" not in r for r in train["results"])
    assert {"baseline", "fast@24", "fast"} <= set(results)
    assert results["fast@24"]["peakReservedGiB"] <= 24
    for r in train["results"]:
        assert r["lossCurve"] and r["measuredSteps"] == train["settings"]["steps"]
    assert train["equivalence"]["maxRelativeDifference"] <= 0.02


def test_variant_options_parse() -> None:
    import bench_train

    v = bench_train.parse_variant("fast@24:8192:nogc:ga=4:dropout=0")
    assert (v["budget"], v["tokens"], v["gc"], v["ga"], v["dropout"]) == (24.0, 8192, False, 4, 0.0)
    with pytest.raises(SystemExit, match="unknown option"):
        bench_train.parse_variant("fast:8192:nogc:speed=11")


def test_dropout_implementation_option_parses() -> None:
    import bench_train

    assert bench_train.parse_variant("fast:12288:nogc")["dropimpl"] == "fused"
    assert bench_train.parse_variant("fast:12288:nogc:dropimpl=peft")["dropimpl"] == "peft"
    with pytest.raises(SystemExit, match="dropimpl=peft or dropimpl=fused"):
        bench_train.parse_variant("fast:12288:nogc:dropimpl=triton")


@pytest.mark.slow
def test_dropout_comparison_runs_on_the_cpu(tmp_path: Path) -> None:
    """The H100 'dropout' mode in miniature: both dropout implementations train, and the
    dropout equivalence (PEFT, PEFT with other masks, fused) is written."""
    out = tmp_path / "dropout.json"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "bench_train.py"), "--shape", "tiny",
            "--build-dir", str(tmp_path / "model"), "--method", "lora", "--rank", "4",
            "--seq-len", "64", "--rows", "60", "--steps", "2", "--warmup-steps", "1",
            "--memory-budget-gib", "1", "--equivalence-group", "4",
            "--dropout-equivalence-steps", "3", "--out", str(out),
            "--variants", "fast:256:nogc:dropimpl=fused,fast:256:nogc:dropimpl=peft",
        ],
        capture_output=True, text=True, check=False, timeout=900,
        env={
            "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer-image'}",
            "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
        },
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    fused, peft = result["results"]
    assert "error" not in fused and "error" not in peft
    assert fused["fastpath"]["lora_dropout"]["implementation"] == "fused"
    assert fused["loraDropoutPatched"] > 0
    assert peft["fastpath"]["lora_dropout"]["implementation"] == "peft"
    assert "loraDropoutPatched" not in peft
    deq = result["dropoutEquivalence"]
    assert len(deq["fused"]) == len(deq["peft"]) == len(deq["peftOtherMasks"]) == 3
    # on the CPU the fused dropout draws PEFT's very masks: the curves agree to rounding
    assert deq["withinTolerance"] is True
    assert deq["fusedVsPeftMaxRelativeDifference"] <= 1e-4
    assert deq["controlMaxRelativeDifference"] > deq["fusedVsPeftMaxRelativeDifference"]
