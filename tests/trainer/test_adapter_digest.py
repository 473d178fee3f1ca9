"""The adapter digest and manifest verification catch any change to any file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.domain.adapter_digest import (
    DigestMismatchError,
    digest_of_files,
    hash_directory,
    verify_directory,
)
from finetune_trainer.manifest import build_manifest, split_uri_revision, verify, write_manifest

SPEC = FineTuneJobSpec.model_validate(
    {
        "baseModel": {"uri": "hf://org/model@abc123"},
        "dataset": {"train": {"uri": "file:///d.jsonl"}},
        "output": {"uri": "file:///out"},
    }
)


def _adapter(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "adapter_config.json").write_text('{"r": 16}')
    (d / "sub").mkdir()
    (d / "sub" / "tokenizer.json").write_text("{}")
    write_manifest(d, build_manifest(d, SPEC, "sha256:" + "0" * 64, {"seed": 1}, {"rougeL": 0.5}))
    return d


def test_manifest_fields(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    assert m["schemaVersion"] == 1
    assert m["baseModel"] == {"uri": "hf://org/model", "revision": "abc123"}
    assert m["method"] == "qlora" and m["rank"] == 16 and m["alpha"] == 32
    assert set(m["files"]) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "sub/tokenizer.json",
    }
    assert m["digest"] == digest_of_files(m["files"])
    assert verify(d) == m["digest"]


def test_digest_definition_is_sorted_path_nul_hash_lines() -> None:
    import hashlib

    files = {"b": "sha256:" + "2" * 64, "a": "1" * 64}
    expected = hashlib.sha256(f"a\0{'1' * 64}\nb\0{'2' * 64}\n".encode()).hexdigest()
    assert digest_of_files(files) == "sha256:" + expected


def test_every_byte_counts(tmp_path: Path) -> None:
    d = _adapter(tmp_path)
    before = digest_of_files(hash_directory(d))
    weights = d / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    for offset in (0, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 0x01
        weights.write_bytes(bytes(changed))
        assert digest_of_files(hash_directory(d)) != before
        with pytest.raises(
            DigestMismatchError, match=r"adapter_model\.safetensors: content differs"
        ):
            verify_directory(d)
    weights.write_bytes(bytes(data))
    assert verify_directory(d) == before


@pytest.mark.parametrize("tamper", ["extra", "missing", "renamed", "manifest-edit"])
def test_verify_catches_tampering(tmp_path: Path, tamper: str) -> None:
    d = _adapter(tmp_path)
    if tamper == "extra":
        (d / "evil.py").write_text("print('x')")
        match = "evil.py: present but not listed"
    elif tamper == "missing":
        (d / "adapter_config.json").unlink()
        match = "adapter_config.json: listed in the manifest but missing"
    elif tamper == "renamed":
        (d / "sub" / "tokenizer.json").rename(d / "tokenizer.json")
        match = "listed in the manifest but missing|present but not listed"
    else:
        m = json.loads((d / "manifest.json").read_text())
        m["files"]["adapter_config.json"] = "sha256:" + "f" * 64
        (d / "manifest.json").write_text(json.dumps(m))
        match = "does not match its own file list"
    with pytest.raises(DigestMismatchError, match=match):
        verify(d)


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest"):
        verify(tmp_path)


def test_uri_revision() -> None:
    assert split_uri_revision("hf://a/b@v1") == ("hf://a/b", "v1")
    assert split_uri_revision("pvc://claim/models/x") == ("pvc://claim/models/x", None)


@pytest.mark.parametrize(
    ("uri", "split"),
    [
        # The last "@" of the text as written, even where StorageUri reads a path after the
        # revision: manifests recorded so far hold exactly these values.
        ("hf://a/b@v1/sub", ("hf://a/b", "v1/sub")),
        ("hf://a/b@r1@r2", ("hf://a/b@r1", "r2")),
        ("hf://a/b", ("hf://a/b", None)),
        ("pvc://claim/x@y", ("pvc://claim/x@y", None)),
        ("s3://bucket/x@y", ("s3://bucket/x@y", None)),
        ("file:///m/x@y", ("file:///m/x@y", None)),
        ("https://hf/a@b", ("https://hf/a@b", None)),
    ],
)
def test_uri_revision_keeps_the_recorded_split(uri: str, split: tuple[str, str | None]) -> None:
    assert split_uri_revision(uri) == split


def test_fetched_adapter_digest_check(tmp_path: Path) -> None:
    from finetune_trainer.cli import check_fetched_digest

    d = _adapter(tmp_path)
    digest = json.loads((d / "manifest.json").read_text())["digest"]
    assert check_fetched_digest(d, digest) is None
    other = "sha256:" + "0" * 64
    assert "differs from the expected" in str(check_fetched_digest(d, other))
    (d / "adapter_config.json").write_text('{"r": 8}')
    assert "content differs" in str(check_fetched_digest(d, digest))
