"""Pytest fixtures of the tests that train: one tiny model per session (a plugin, see
tests/conftest.py); helpers are in support.trainer_samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One math thread per process: the tiny model gains nothing from more, and on a busy
# two-core machine idle OpenMP threads spinning against each other waste CPU time.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tinymodel import build_tiny_model

    # initializer_range 0.3: output-head weights large enough for LoRA to learn a confident
    # answer in a few dozen steps (at the default 0.02 the loss plateaus near ln(vocab)).
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), initializer_range=0.3)
