"""The settings of a few packed training steps of the tiny model on the CPU, shared by the
fast-path, offload and LoRA dropout tests (each adds what it compares)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def packed_cpu_args(output_dir: str | Path, **overrides: Any) -> Any:
    """TRL's SFTConfig for five packed (bfd, padding-free) steps at a constant learning rate,
    one logged loss per step, nothing saved; ``overrides`` win."""
    from trl import SFTConfig

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 5,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 1,
        "max_length": 96,
        "packing": True,
        "packing_strategy": "bfd",
        "padding_free": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "lr_scheduler_type": "constant",
        "disable_tqdm": True,
    }
    return SFTConfig(**(settings | overrides))
