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


@pytest.mark.parametrize(
    "script",
    ["bench_train.py", "bench_unsloth.py", "bench_vram.py", "bench_lora4bit_host.py", "data.py"],
)
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


def test_offload_and_unsloth_variants_parse() -> None:
    import bench_train

    v = bench_train.parse_variant("fast:16384:gc:offload")
    assert (v["tokens"], v["gc"], v["offload"]) == (16384, True, True)
    assert bench_train.parse_variant("fast:16384:gc")["offload"] is None
    with pytest.raises(SystemExit, match="needs gc"):
        bench_train.parse_variant("fast:16384:nogc:offload")
    u = bench_train.parse_variant("unsloth:16384")
    assert (u["kind"], u["tokens"], u["dropout"]) == ("unsloth", 16384, 0.0)
    assert bench_train.parse_variant("unsloth")["tokens"] == 8192
    with pytest.raises(SystemExit, match="unsloth"):
        bench_train.parse_variant("unsloth:many")


def test_lora4bit_variant_parses_and_refuses_what_it_cannot_combine() -> None:
    import bench_train

    assert bench_train.parse_variant("fast:12288:nogc:lora4bit")["lora4bit"] is True
    assert bench_train.parse_variant("fast:12288:nogc:nolora4bit")["lora4bit"] is False
    assert bench_train.parse_variant("fast:12288:nogc")["lora4bit"] is None  # as the trainer
    assert bench_train.parse_variant("fast@24:::lora4bit")["budget"] == 24.0
    assert bench_train.parse_variant("fast@24:::flatoptim")["flatoptim"] is True
    assert bench_train.parse_variant("fast@24")["flatoptim"] is None  # the fast path's default
    for text in ("fast:8192:gc:lora4bit:compile", "fast:8192:gc:lora4bit:dropimpl=peft"):
        with pytest.raises(SystemExit, match="lora4bit"):
            bench_train.parse_variant(text)


def test_optimizer_variant_parses() -> None:
    import bench_train

    assert bench_train.parse_variant("fast:8192:gc")["optim"] == "paged_adamw_8bit"
    v = bench_train.parse_variant("fast:8192:gc:optim=adamw_torch_fused")
    assert v["optim"] == "adamw_torch_fused"
    with pytest.raises(SystemExit, match="unknown optim"):
        bench_train.parse_variant("fast:8192:gc:optim=lion")


def test_stored_unsloth_run_is_side_by_side() -> None:
    """The run docs/benchmarks.md compares: Unsloth and batchSize: auto in one invocation, with
    the fast path's defaults of that day (fused 4-bit projections from 8,192 tokens), against
    the issue's goals on both the window and the median-step figures."""
    speed = json.loads((REPO / "bench/results/h100-2026-12-07c/speed.json").read_text())
    results = {r["variant"]: r for r in speed["results"]}
    assert all("error" not in r for r in speed["results"])
    assert {"unsloth:4096", "unsloth:8192", "unsloth:16384"} <= set(results)
    assert results["unsloth:8192"]["environment"]["unsloth"] == "2026.10.9"
    unsloth = [r for name, r in results.items() if name.startswith("unsloth")]
    for budget, goal in ((8, 1.2), (10, 1.2), (16, 1.2), (24, 1.5)):
        run = results[f"fast@{budget}"]
        assert ("lora4bit" in run) == (run["config"]["max_length"] >= 8192), budget
        assert run["peakReservedGiB"] <= budget
        within = [r for r in unsloth if r["peakReservedGiB"] <= budget]
        for figure in ("effectiveTokensPerSecond", "medianStepTokensPerSecond"):
            assert run[figure] >= goal * max(r[figure] for r in within), (budget, figure)


def test_unsloth_child_gets_its_site_first_and_the_runs_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    import bench_train
    import bench_unsloth

    monkeypatch.setenv("PYTHONPATH", "/base/site:/repo/operator")
    monkeypatch.delenv("UNSLOTH_DISABLE_STATISTICS", raising=False)
    args = argparse.Namespace(
        method="qlora", rank=64, steps=5, warmup_steps=2, rows=900, seed=3, lr=2e-4,
        peak_tflops=800.0, unsloth_site=str(tmp_path / "unsloth"),
    )  # fmt: skip
    variant = bench_train.parse_variant("unsloth:16384")
    command, env = bench_train.unsloth_command(variant, args, "/tmp/m8b", tmp_path / "r.json")
    assert command[1].endswith("bench/bench_unsloth.py") and Path(command[1]).exists()
    assert env["PYTHONPATH"].split(":") == [
        str(tmp_path / "unsloth"),
        "/base/site",
        "/repo/operator",
    ]
    assert env["HF_HUB_OFFLINE"] == "1" and env["UNSLOTH_DISABLE_STATISTICS"] == "1"
    # the child reads back exactly what the parent meant
    child = bench_unsloth.parse_args(command[2:])
    assert (child.model_dir, child.name, child.tokens, child.method) == (
        "/tmp/m8b", "unsloth:16384", 16384, "qlora"
    )  # fmt: skip
    assert (child.rank, child.steps, child.warmup_steps, child.rows, child.seed) == (
        64,
        5,
        2,
        900,
        3,
    )
    assert (child.lr, child.out) == (2e-4, tmp_path / "r.json")


def test_step_metrics_count_only_the_measured_steps() -> None:
    import argparse

    import bench_train
    from finetune_operator.domain.estimator import ModelShape

    shape = ModelShape(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=100,
    )  # fmt: skip
    args = argparse.Namespace(warmup_steps=1, steps=2, rank=8, peak_tflops=1.0)
    micro = [{"lengths": [100, 50], "loss_tokens": 90, "padded": 150}] * 3
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    m = bench_train.step_metrics([0.0, 5.0, 6.0, 8.0], micro, 1, history, shape, args)
    assert m["measuredSteps"] == 2 and m["stepTimeS"] == 1.5  # the 5 s warm-up step is left out
    assert m["effectiveTokensPerSecond"] == 100.0  # 300 tokens in 3 s
    # measured steps at 150/1 s and 150/2 s: the median of two is the upper one
    assert m["medianStepTokensPerSecond"] == 150.0
    short = [{"lengths": [100, 50], "loss_tokens": 90, "padded": 150}] * 3 + [
        {"lengths": [10], "loss_tokens": 5, "padded": 10}
    ]
    args.steps = 3
    stamps = [0.0, 5.0, 6.0, 7.0, 8.0]  # three measured steps of 1 s, the last one a short bin
    m = bench_train.step_metrics(stamps, short, 1, history, shape, args)
    assert m["effectiveTokensPerSecond"] == 103.3  # 310 tokens in 3 s
    assert m["medianStepTokensPerSecond"] == 150.0  # the short bin does not move it
    assert [p["tokensSeen"] for p in m["lossCurve"]] == [150, 300, 450]


def test_dropout_implementation_option_parses() -> None:
    import bench_train

    assert bench_train.parse_variant("fast:12288:nogc")["dropimpl"] == "fused"
    assert bench_train.parse_variant("fast:12288:nogc:dropimpl=peft")["dropimpl"] == "peft"
    with pytest.raises(SystemExit, match="dropimpl=peft or dropimpl=fused"):
        bench_train.parse_variant("fast:12288:nogc:dropimpl=triton")


def test_compile_options_parse() -> None:
    import bench_train

    plain = bench_train.parse_variant("fast:8192:gc")
    assert (plain["compile"], plain["liger"]) == (False, None)
    v = bench_train.parse_variant("fast:12288:nogc:dropout=0:compile")
    assert (v["tokens"], v["gc"], v["dropout"], v["compile"], v["liger"]) == (
        12288, False, 0.0, True, None
    )  # fmt: skip
    assert bench_train.parse_variant("fast:8192:gc:compile:liger")["liger"] is True
    with pytest.raises(SystemExit, match="use it with compile"):
        bench_train.parse_variant("fast:8192:gc:liger")


def test_the_h100_compile_mode_runs_eager_and_compiled_variants_that_parse() -> None:
    import re

    import bench_train

    script = (REPO / "bench" / "run_h100.sh").read_text()
    mode = script[script.index("\n  compile)") : script.index(";;", script.index("\n  compile)"))]
    runs = dict(re.findall(r'^\s*compile_run (\S+) "([^"]+)"', mode, re.MULTILINE))
    parsed = {
        name: [bench_train.parse_variant(v) for v in text.split(",")] for name, text in runs.items()
    }
    assert set(parsed) == {"compile-eager", "compile"}
    assert not any(v["compile"] for v in parsed["compile-eager"])
    assert all(v["compile"] for v in parsed["compile"])
    # each eager variant has its compiled twin
    shape = ("tokens", "gc", "dropout")
    eager = {tuple(v[k] for k in shape) for v in parsed["compile-eager"]}
    assert eager <= {tuple(v[k] for k in shape) for v in parsed["compile"]}


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
            "--dropout-equivalence-curves", "fused,lora4bit",
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


def test_every_variant_list_in_the_h100_script_parses() -> None:
    """A typo in run_h100.sh would only show on a GPU machine, after minutes of set-up."""
    import re

    import bench_train

    script = (REPO / "bench" / "run_h100.sh").read_text()
    lists = re.findall(r'--variants "([^"]+)"', script)
    lists = [re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", x) for x in lists]  # the defaults
    assert len(lists) >= 7
    for text in lists:
        for variant in text.split(","):
            if variant and not variant.startswith("$"):
                assert bench_train.parse_variant(variant)["name"] == variant
    with pytest.raises(SystemExit, match="use gc or nogc"):
        bench_train.parse_variant("fast:8192:gcx")
