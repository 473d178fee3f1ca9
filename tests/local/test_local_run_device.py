"""`finetune-local run` on a machine without a GPU: a LoRA job asking for GPUs falls
back to the CPU with a warning; QLoRA or a forced --device cuda says what to do instead; the
preflight reads the model's own config.json from the mapped folder."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_local.localrun import (
    LocalRunError,
    choose_device,
    read_model_config,
    run_local,
)
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.config import OperatorConfig
from finetune_operator.planners.finetunejob import check_fit

INTENTS = ["refund", "question", "complaint", "cancel"]


def job_spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "pvc://models/tiny"},
        "dataset": {"train": {"uri": "pvc://data/train.jsonl"}, "evalSplit": 0.25},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"maxSteps": 2, "batchSize": 2, "gradientCheckpointing": False,
                     "optimizer": "adamw_torch", "maxSeqLength": 64, "loggingEverySteps": 1},
        "resources": {"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
        "output": {"uri": "pvc://out/run"},
        "evaluation": {"maxNewTokens": 2, "maxSamples": 2},
        "qualityGates": [{"metric": "evalLoss", "max": 1000.0}],
    }  # fmt: skip
    body.update(overrides)
    return body


def test_a_lora_job_asking_for_a_gpu_runs_on_the_cpu_with_a_warning() -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(resources={"gpus": 2}))
    chosen, device, warning = choose_device(spec, "auto", gpu_gib=None)
    assert device == "cpu" and chosen.resources.gpus == 0
    assert warning is not None and "no CUDA GPU" in warning and "--device cuda" in warning
    assert spec.resources.gpus == 2  # the manifest's spec is not changed in place


@pytest.mark.parametrize(
    ("overrides", "device", "says"),
    [({"method": "qlora"}, "auto", "method: qlora"), ({}, "cuda", "--device cuda")],
)
def test_what_cannot_run_without_a_gpu_says_what_to_do(
    overrides: dict[str, Any], device: str, says: str
) -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(**overrides))
    with pytest.raises(LocalRunError, match=says) as raised:
        choose_device(spec, device, gpu_gib=None)
    assert "--device cpu" in str(raised.value) and "method: lora" in str(raised.value)


def test_with_a_gpu_nothing_changes() -> None:
    spec = FineTuneJobSpec.model_validate(job_spec(method="qlora"))
    assert choose_device(spec, "auto", gpu_gib=24.0) == (spec, "auto", None)


def test_the_preflight_reads_the_shape_from_the_mapped_config_json(tmp_path: Path) -> None:
    shape = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
             "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shape))
    spec = FineTuneJobSpec.model_validate(job_spec(baseModel={"uri": "pvc://models/my-model"}))
    blind = check_fit(spec, {}, OperatorConfig())
    assert blind.reason == "ModelShapeUnknown"
    fit = check_fit(spec, {}, OperatorConfig(), read_model_config(tmp_path))
    assert fit.status == "True" and f"config.json in {tmp_path}" in fit.message
    assert read_model_config(tmp_path / "missing") is None


@pytest.mark.slow
def test_local_run_without_a_gpu_trains_on_the_cpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from finetune_trainer.tinymodel import build_tiny_model

    build_tiny_model(tmp_path / "models" / "tiny")
    rows = [{"prompt": f"Ticket {i}: {INTENTS[i % 4]}?", "completion": INTENTS[i % 4]}
            for i in range(16)]  # fmt: skip
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1",
                                        "kind": "FineTuneJob", "metadata": {"name": "run"},
                                        "spec": job_spec()}))  # fmt: skip
    out = io.StringIO()
    pvcs = [f"{claim}={tmp_path / claim}" for claim in ("models", "data", "out")]
    result = run_local(manifest, pvcs, out=out)
    text = out.getvalue()
    assert "no CUDA GPU is visible here: training on the CPU" in text, text
    assert result.exit_code == 0, text
    assert result.trainer_config.device == "cpu"
