"""Fixtures of the evaluation tests: a tiny random model on disk and configs pointing at it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from evalkit import make_config
from finetune_operator.api.trainer_config import TrainerConfig


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def config_factory(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., TrainerConfig]:
    def factory(**kw: Any) -> TrainerConfig:
        return make_config(tiny_model_dir, tmp_path / "out", **kw)

    return factory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
