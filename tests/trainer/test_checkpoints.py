"""Which checkpoint a restarted run resumes from (file-system only, no training)."""

from __future__ import annotations

from pathlib import Path

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_trainer.checkpoints import (
    STATE_FILE,
    prepare_for_resume,
    run_fingerprint,
    write_marker,
)

SPEC = FineTuneJobSpec.model_validate(
    {
        "baseModel": {"uri": "file:///m"},
        "dataset": {"train": {"uri": "file:///d.jsonl"}},
        "output": {"uri": "file:///out"},
    }
)
FP = run_fingerprint(SPEC, "sha256:data")


def _ckpt(root: Path, step: int, *, state: bool = True, marker: str | None = FP) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w")
    if state:
        (d / STATE_FILE).write_text("{}")
    if marker is not None:
        write_marker(d, marker, step)
    return d


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert prepare_for_resume(tmp_path / "checkpoints", FP) is None


def test_resumes_newest_complete_and_removes_partial(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _ckpt(root, 10)
    _ckpt(root, 20)
    partial_no_marker = _ckpt(root, 30, marker=None)
    partial_no_state = _ckpt(root, 40, state=False)
    assert prepare_for_resume(root, FP) == root / "checkpoint-20"
    assert not partial_no_marker.exists() and not partial_no_state.exists()
    assert (root / "checkpoint-10").exists()


def test_checkpoints_of_another_run_are_moved_aside(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _ckpt(root, 10)
    _ckpt(root, 50, marker=run_fingerprint(SPEC, "sha256:other-data"))
    assert prepare_for_resume(root, FP) == root / "checkpoint-10"
    assert not (root / "checkpoint-50").exists()
    assert (tmp_path / "checkpoints-stale" / "checkpoint-50").is_dir()


def test_fingerprint_ignores_checkpoint_and_logging_intervals() -> None:
    other = SPEC.model_copy(deep=True)
    other.training.checkpoint_every_steps = 7
    other.training.logging_every_steps = 3
    assert run_fingerprint(other, "sha256:data") == FP
    other.training.learning_rate = 1e-3
    assert run_fingerprint(other, "sha256:data") != FP
    assert run_fingerprint(SPEC, "sha256:x") != FP
