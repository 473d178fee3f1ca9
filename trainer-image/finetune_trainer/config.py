"""Load the trainer configuration (``TrainerConfig``) from a YAML or JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_operator.api.trainer_config import TrainerConfig

from .errors import invalid_config


def parse_config_text(text: str, source: str = "<config>") -> TrainerConfig:
    """Parse YAML or JSON text into a validated ``TrainerConfig``."""
    import yaml
    from pydantic import ValidationError

    try:
        raw: Any = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise invalid_config(f"{source}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise invalid_config(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise invalid_config(f"{source}: invalid trainer config: {problems}") from exc


def load_config(path: str | Path) -> TrainerConfig:
    """Read and validate a config file; a missing or bad file is an ``InvalidConfig`` error."""
    p = Path(path)
    if not p.is_file():
        raise invalid_config(
            f"config file {p} not found: pass --config with the job's YAML/JSON file"
        )
    return parse_config_text(p.read_text(encoding="utf-8"), source=str(p))
