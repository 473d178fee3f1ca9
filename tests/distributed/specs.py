"""FineTuneJob specs for the distributed tests (several GPUs, several nodes)."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator.api.finetunejob import FineTuneJobSpec

BASE: dict[str, Any] = {
    "baseModel": {"uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct@main"},
    "dataset": {"train": {"uri": "pvc://datasets/support/train.jsonl"}},
    "method": "qlora",
    "lora": {"r": 64},
    "training": {"maxSeqLength": 2048, "batchSize": 4, "gradientCheckpointing": True},
    "resources": {"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
    "output": {"uri": "pvc://adapters/support-bot"},
}


def spec_dict(**resources: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["resources"].update(resources)
    return raw


def spec(**resources: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec_dict(**resources))
