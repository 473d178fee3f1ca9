"""Resumable checkpoints: which ones are complete, which run they belong to, where to resume.

A checkpoint counts as complete only once the trainer has finished writing it: a callback
writes ``checkpoint_complete.json`` (atomically, via rename) after transformers' ``on_save``,
so a pod killed mid-save leaves a folder without the marker, which is ignored and removed.
The marker also records a fingerprint of the run (data digest and training settings); a
checkpoint from a different run is never resumed (docs/decisions/0101-checkpoint-resume.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.api.finetunejob import FineTuneJobSpec

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

MARKER = "checkpoint_complete.json"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def run_fingerprint(spec: FineTuneJobSpec, data_digest: str) -> str:
    """sha256 of everything that must match for a checkpoint to be resumed."""
    training = spec.training.model_dump(
        mode="json", exclude={"checkpoint_every_steps", "logging_every_steps"}
    )
    material = {
        "baseModel": spec.base_model.uri,
        "method": spec.method,
        "lora": spec.lora.model_dump(mode="json"),
        "quantization": (
            q.model_dump(mode="json") if (q := spec.resolved_quantization()) else None
        ),
        "training": training,
        "data": data_digest,
    }
    return "sha256:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def checkpoint_step(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """checkpoint-<step> folders, newest (highest step) first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0, reverse=True)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / STATE_FILE).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_marker(path: Path, fingerprint: str, step: int) -> None:
    """Mark a checkpoint complete (write to a temp file, then rename: never half written)."""
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "step": step}), encoding="utf-8")
    os.replace(tmp, path / MARKER)


def prepare_for_resume(checkpoint_dir: str | Path, fingerprint: str) -> Path | None:
    """Tidy ``checkpoint_dir`` and return the checkpoint to resume from, if any.

    Incomplete checkpoints (killed mid-save) are removed. Complete checkpoints of a different
    run (other data or settings) are moved aside to ``<dir>-stale`` so they cannot be resumed
    or confuse checkpoint rotation.
    """
    root = Path(checkpoint_dir)
    resume: Path | None = None
    stale: list[Path] = []
    for ckpt in list_checkpoints(root):
        if not is_complete(ckpt):
            log.warning("removing incomplete checkpoint %s (written by an interrupted run)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
        elif read_marker(ckpt).get("fingerprint") != fingerprint:
            stale.append(ckpt)
        elif resume is None:
            resume = ckpt
    if stale:
        aside = root.parent / (root.name + "-stale")
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir(parents=True)
        for ckpt in stale:
            log.warning(
                "checkpoint %s belongs to a run with other data or settings; moved to %s",
                ckpt,
                aside,
            )
            shutil.move(str(ckpt), aside / ckpt.name)
    return resume


def make_checkpoint_callback(
    fingerprint: str, on_complete: Callable[[Path, int], None] | None = None
) -> TrainerCallback:
    """A ``TrainerCallback`` that marks each checkpoint complete after transformers saved it,
    then hands it to ``on_complete`` (the s3:// checkpoint upload)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class CheckpointMarker(TrainerCallback):
        def on_save(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
        ) -> None:
            # TrainingArguments always fills output_dir; its type still allows None.
            if not state.is_world_process_zero or args.output_dir is None:
                return
            path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if path.is_dir():
                write_marker(path, fingerprint, state.global_step)
                if on_complete is not None:
                    on_complete(path, state.global_step)

    return CheckpointMarker()
