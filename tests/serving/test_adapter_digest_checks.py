"""Digest checks before serving: the operator's file:// check and the fetch step's --digest."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_operator.clients.adapter_store import read_local_manifest
from finetune_trainer.fetch import FetchError, check_digest
from support.adapters import make_adapter


def test_local_manifest(tmp_path: Path) -> None:
    uri, digest = make_adapter(tmp_path, "a", rank=32, base_model="hf://org/base")
    got = read_local_manifest(uri)
    assert got is not None
    assert (got.digest, got.rank, got.base_model, got.error) == (digest, 32, "hf://org/base", None)
    assert read_local_manifest("pvc://claim/a") is None
    missing = read_local_manifest(f"file://{tmp_path}/nothing")
    assert missing is not None and missing.missing


def test_tampered_adapter_is_reported(tmp_path: Path) -> None:
    uri, _ = make_adapter(tmp_path, "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"changed")
    got = read_local_manifest(uri)
    assert got is not None and got.digest is None
    assert "adapter_model.safetensors" in (got.error or "")


def test_fetch_step_checks_the_digest(tmp_path: Path) -> None:
    _, digest = make_adapter(tmp_path, "a")
    check_digest(tmp_path / "a", digest)
    with pytest.raises(FetchError, match="expected sha256:0000"):
        check_digest(tmp_path / "a", "sha256:" + "0" * 64)
    (tmp_path / "a" / "extra.bin").write_bytes(b"x")
    with pytest.raises(FetchError, match="not a verifiable adapter"):
        check_digest(tmp_path / "a", digest)
