"""The VRAM estimator against measured reference points, and the choices built on it."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.domain import estimator as est

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "h100-2026-11-23"
# bench/shapes.py names -> the estimator's known families (same dimensions).
SHAPE_FAMILY = {
    "llama3-8b": "llama-3-8b",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen2.5-1.5b": "qwen2.5-1.5b",
    "qwen2.5-3b": "qwen2.5-3b",
}

LLAMA3_8B = est.MODEL_FAMILIES["llama-3-8b"]
H100 = est.gpu_memory_gib("NVIDIA-H100-80GB-HBM3")
REFERENCE = est.TrainingSetup(
    lora_rank=64, micro_batch=4, seq_length=2048, optimizer="paged_adamw_8bit"
)


def _measured(name: str) -> list[dict[str, Any]]:
    return [r for r in json.loads((RESULTS / name).read_text())["results"] if "measuredGiB" in r]


SWEEP = _measured("vram.json")


def _setup(row: dict[str, Any]) -> est.TrainingSetup:
    """The estimator inputs of one measured configuration, as bench/bench_vram.py builds them."""
    return est.TrainingSetup(
        method=row["method"],
        lora_rank=row["rank"],
        micro_batch=row["batch"],
        seq_length=row["seq"],
        gradient_checkpointing=row["gc"],
        optimizer="paged_adamw_8bit",
    )


def _ratio(row: dict[str, Any]) -> float:
    shape = est.MODEL_FAMILIES[SHAPE_FAMILY[row["shape"]]]
    return est.estimate_memory(shape, _setup(row)).peak_gib / row["measuredGiB"]


@pytest.mark.parametrize("row", SWEEP, ids=[r["name"] for r in SWEEP])
def test_h100_sweep_point_within_tolerance(row: dict[str, Any]) -> None:
    # Stated tolerance: at most 20% over, at most 5% under (an under-prediction is an OOM).
    assert 0.95 <= _ratio(row) <= 1.20, row["name"]


def test_h100_sweep_median_error_within_10_percent() -> None:
    assert len(SWEEP) >= 10
    assert statistics.median(abs(_ratio(r) - 1) for r in SWEEP) <= 0.10


def test_breakdown_adds_up_to_the_peak() -> None:
    estimate = est.estimate_memory(LLAMA3_8B, REFERENCE)
    assert sum(estimate.breakdown.values()) == pytest.approx(estimate.peak_gib, abs=0.05)


def _measured_slope_8b_qlora_r64_gc() -> tuple[float, float]:
    """(fixed GiB, GiB per token) through the two measured Llama-3-8B QLoRA r=64 GC points."""
    points = sorted(
        (r["batch"] * r["seq"], r["measuredGiB"])
        for r in SWEEP
        if r["shape"] == "llama3-8b" and r["method"] == "qlora" and r["rank"] == 64 and r["gc"]
    )
    assert len(points) == 2
    (t1, m1), (t2, m2) = points
    per_token = (m2 - m1) / (t2 - t1)
    return m1 - per_token * t1, per_token


def test_auto_batch_on_h100_fits_the_measured_memory_line() -> None:
    # The trainer CLI went OutOfMemory with the batch the old estimator chose here.
    failed = json.loads((RESULTS / "trainer-cli.json").read_text())["runs"][0]
    assert failed["result"]["reason"] == "OutOfMemory"
    oom_batch = int(re.search(r"batch size (\d+)", failed["result"]["message"]).group(1))
    gpu = 81559 / 1024  # MiB of the measured card (gpu.txt), as torch reports it
    setup = est.TrainingSetup(lora_rank=64, seq_length=2048)
    batch, gc, estimate = est.choose_batch_and_checkpointing(LLAMA3_8B, setup, gpu)
    assert gc is True and batch < oom_batch
    fixed, per_token = _measured_slope_8b_qlora_r64_gc()
    # Extrapolating the measured peaks linearly in tokens, the choice keeps 15% free ...
    assert fixed + per_token * batch * 2048 <= 0.85 * gpu
    # ... the estimate is not below that extrapolation, and the failed batch is predicted not to fit.
    assert estimate.peak_gib >= 0.95 * (fixed + per_token * batch * 2048)
    assert not est.estimate_memory(LLAMA3_8B, replace(setup, micro_batch=oom_batch)).fits(gpu)


def test_auto_batch_is_capped_by_tokens_per_micro_batch() -> None:
    tiny = est.MODEL_FAMILIES["qwen2.5-0.5b"]
    short = est.TrainingSetup(lora_rank=16, seq_length=256)
    batch, _gc, _est = est.choose_batch_and_checkpointing(tiny, short, 139.8)
    assert batch * 256 <= est.MAX_AUTO_TOKENS_PER_MICRO_BATCH and batch <= est.MAX_AUTO_BATCH
    long = replace(short, seq_length=32768)
    assert est.choose_batch_and_checkpointing(tiny, long, 139.8)[0] == 1


def test_auto_batch_keeps_its_own_headroom_even_when_asked_for_less() -> None:
    gpu = 30.0
    batch, gc, estimate = est.choose_batch_and_checkpointing(
        LLAMA3_8B, REFERENCE, gpu, headroom=0.0
    )
    assert estimate.peak_gib <= gpu * (1 - est.AUTO_HEADROOM)
    bigger = est.estimate_memory(
        LLAMA3_8B, replace(REFERENCE, micro_batch=2 * batch, gradient_checkpointing=gc)
    )
    assert bigger.peak_gib > gpu * (1 - est.AUTO_HEADROOM)


def test_parameter_counts_match_published_sizes() -> None:
    assert LLAMA3_8B.parameters() == pytest.approx(8.03e9, rel=0.005)
    assert est.MODEL_FAMILIES["qwen2.5-0.5b"].parameters() == pytest.approx(0.494e9, rel=0.01)
    assert est.MODEL_FAMILIES["qwen2.5-7b"].parameters() == pytest.approx(7.62e9, rel=0.01)
    assert est.MODEL_FAMILIES["mistral-7b"].parameters() == pytest.approx(7.25e9, rel=0.01)


def test_shape_from_hf_config_dict() -> None:
    config = {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    }
    assert est.ModelShape.from_hf_config(config) == LLAMA3_8B
    with pytest.raises(ValueError, match="hidden_size"):
        est.ModelShape.from_hf_config({"vocab_size": 10})


def test_adapter_parameters_for_rank_and_targets() -> None:
    all_linear = est.estimate_memory(LLAMA3_8B, REFERENCE).adapter_parameters
    assert all_linear == 64 * 32 * (
        2 * (4096 + 4096) + 2 * (4096 + 1024) + 2 * (4096 + 14336) + (14336 + 4096)
    )
    qv = est.estimate_memory(
        LLAMA3_8B, replace(REFERENCE, target_modules=("q_proj", "v_proj"))
    ).adapter_parameters
    assert qv == 64 * 32 * ((4096 + 4096) + (4096 + 1024))


def test_each_memory_lever_lowers_the_estimate() -> None:
    heavy = replace(REFERENCE, method="lora", gradient_checkpointing=False, optimizer="adamw_torch")
    base = est.estimate_memory(LLAMA3_8B, heavy).peak_gib
    levers = (
        {"gradient_checkpointing": True},
        {"micro_batch": 1},
        {"seq_length": 1024},
        {"lora_rank": 8},
        {"optimizer": "paged_adamw_8bit"},
        {"target_modules": ("q_proj", "v_proj")},
    )
    for lever in levers:
        assert est.estimate_memory(LLAMA3_8B, replace(heavy, **lever)).peak_gib < base, lever
    # QLoRA saves weight memory but runs a float32 residual stream (measured): it lowers the
    # peak when weights dominate, not necessarily for long unchecked sequences.
    short = replace(heavy, micro_batch=1, seq_length=1024)
    lowered = est.estimate_memory(LLAMA3_8B, replace(short, method="qlora")).peak_gib
    assert lowered < est.estimate_memory(LLAMA3_8B, short).peak_gib


def test_choose_prefers_no_checkpointing_when_it_fits() -> None:
    small = est.MODEL_FAMILIES["qwen2.5-0.5b"]
    setup = est.TrainingSetup(method="lora", lora_rank=16, seq_length=1024)
    batch, gc, estimate = est.choose_batch_and_checkpointing(small, setup, H100)
    assert gc is False and batch == est.max_auto_batch(1024)
    assert estimate.fits(H100, est.AUTO_HEADROOM)
    # On the 8B shape at 2048 tokens no unchecked batch of 4 fits: checkpointing goes on.
    assert est.choose_batch_and_checkpointing(LLAMA3_8B, REFERENCE, H100)[1] is True


def test_choose_turns_checkpointing_on_for_a_small_gpu() -> None:
    l4 = est.gpu_memory_gib("NVIDIA-L4")
    batch, gc, estimate = est.choose_batch_and_checkpointing(LLAMA3_8B, REFERENCE, l4)
    assert gc is True and batch >= 1
    assert estimate.fits(l4, 0.1)


def test_choose_keeps_what_the_user_fixed() -> None:
    batch, gc, estimate = est.choose_batch_and_checkpointing(
        LLAMA3_8B, REFERENCE, H100, batch=2, gradient_checkpointing=True
    )
    assert (batch, gc) == (2, True)
    assert estimate.setup.micro_batch == 2


def test_choose_reports_no_fit() -> None:
    t4 = est.gpu_memory_gib("Tesla-T4")
    _batch, _gc, estimate = est.choose_batch_and_checkpointing(
        est.MODEL_FAMILIES["llama-3-70b"], REFERENCE, t4
    )
    assert not estimate.fits(t4, 0.1)


def test_suggested_fixes_each_fit_when_applied() -> None:
    l4 = est.gpu_memory_gib("NVIDIA-L4")
    failing = replace(REFERENCE, method="lora", gradient_checkpointing=False)
    fixes = est.suggest_fixes(LLAMA3_8B, failing, l4)
    assert fixes
    assert all(f.peak_gib <= l4 * 0.9 for f in fixes)
    assert any("method: qlora" in f.change for f in fixes)
    assert any("gradientCheckpointing: true" in f.change for f in fixes)


def test_suggested_fixes_fall_back_to_shorter_sequences() -> None:
    fixes = est.suggest_fixes(
        LLAMA3_8B, replace(REFERENCE, method="lora", seq_length=8192, micro_batch=8), 12.0
    )
    assert fixes and "maxSeqLength" in fixes[0].change
    assert fixes[0].peak_gib <= 12.0 * 0.9


def test_no_fix_for_a_model_larger_than_the_gpu() -> None:
    assert est.suggest_fixes(est.MODEL_FAMILIES["llama-3-70b"], REFERENCE, 15.0) == []


@pytest.mark.parametrize(
    ("product", "gib"),
    [
        ("NVIDIA-H100-80GB-HBM3", 79.6),
        ("NVIDIA-H200", 139.8),
        ("NVIDIA-A100-SXM4-40GB", 39.4),
        ("NVIDIA-A100-SXM4-80GB", 79.2),
        ("NVIDIA-L4", 22.0),
        ("NVIDIA-L40S", 44.4),
        ("NVIDIA-A10G", 22.0),
        ("NVIDIA-GeForce-RTX-4090", 23.6),
        ("Tesla-T4", 14.6),
        ("Unknown-Accelerator", None),
        (None, None),
    ],
)
def test_gpu_memory_table(product: str | None, gib: float | None) -> None:
    assert est.gpu_memory_gib(product) == gib


def test_gpu_memory_overrides_win() -> None:
    assert est.gpu_memory_gib("NVIDIA-B300", {"NVIDIA-B300": 270}) == 270.0
    assert est.gpu_memory_gib("NVIDIA-L4", {"nvidia-l4": 20}) == 20.0


@pytest.mark.parametrize(
    ("uri", "family"),
    [
        ("hf://meta-llama/Meta-Llama-3-8B-Instruct@main", "llama-3-8b"),
        ("hf://meta-llama/Llama-3.1-8B", "llama-3-8b"),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
        ("hf://Qwen/Qwen2.5-7B", "qwen2.5-7b"),
        ("hf://mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
        ("hf://google/gemma-1.1-7b-it", "gemma-7b"),
        ("hf://google/gemma-2-9b", None),
        ("pvc://models/llama-3.2-1b", "llama-3.2-1b"),
        ("hf://acme/secret-model", None),
    ],
)
def test_family_from_uri(uri: str, family: str | None) -> None:
    assert est.family_from_uri(uri) == family


def test_shape_hint_forms() -> None:
    assert est.shape_from_hint({"family": "qwen2.5-7b"}) == est.MODEL_FAMILIES["qwen2.5-7b"]
    assert est.shape_from_hint("llama-3-8b") == LLAMA3_8B
    with pytest.raises(ValueError, match="unknown model family"):
        est.shape_from_hint({"family": "gpt-5"})
    with pytest.raises(ValueError):
        est.shape_from_hint([1, 2])


def test_trainer_entry_point_reads_config_json(tmp_path) -> None:
    from finetune_operator.api.finetunejob import FineTuneJobSpec
    from support.ftj_samples import spec

    (tmp_path / "config.json").write_text(
        '{"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,'
        ' "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": true}'
    )
    parsed = FineTuneJobSpec.model_validate(
        spec(training={"batchSize": "auto", "gradientCheckpointing": None})
    )
    batch, _gc, estimate = est.choose_for_spec(parsed, 22.0, str(tmp_path))
    assert estimate.parameters == est.MODEL_FAMILIES["qwen2.5-0.5b"].parameters()
    assert batch >= 4 and estimate.fits(22.0)
    # Without a config.json the URI's family is used; a fixed batch is kept.
    fixed = FineTuneJobSpec.model_validate(
        spec(training={"batchSize": 2, "gradientCheckpointing": True})
    )
    assert est.choose_for_spec(fixed, 79.6, str(tmp_path / "none"))[:2] == (2, True)
