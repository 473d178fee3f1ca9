"""``manifest.json`` of an adapter: what it was trained from and a digest over its files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypedDict

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.domain.adapter_digest import (
    MANIFEST_NAME,
    DigestMismatchError,
    digest_of_files,
    hash_directory,
    verify_directory,
)
from finetune_operator.domain.uris import split_scheme

__all__ = [
    "AdapterManifest",
    "DigestMismatchError",
    "adapter_size_bytes",
    "build_manifest",
    "split_uri_revision",
    "verify",
    "write_manifest",
]

SCHEMA_VERSION = 1


class ManifestBaseModel(TypedDict):
    uri: str
    revision: str | None


class AdapterManifest(TypedDict):
    """``manifest.json``, keys as written."""

    schemaVersion: int
    baseModel: ManifestBaseModel
    method: str
    rank: int
    alpha: int
    targetModules: list[str]
    datasetDigest: str
    trainingArguments: dict[str, Any]
    metrics: dict[str, float]
    files: dict[str, str]
    digest: str


def split_uri_revision(uri: str) -> tuple[str, str | None]:
    """``hf://org/name@rev`` -> (``hf://org/name``, ``rev``); other URIs have no revision.

    The split is at the last ``@`` of the text as written (not :class:`StorageUri`'s revision):
    recorded manifests, and so adapter digests, depend on it.
    """
    if split_scheme(uri)[0] == "hf" and "@" in uri:
        base, rev = uri.rsplit("@", 1)
        return base, rev
    return uri, None


def build_manifest(
    adapter_dir: str | Path,
    spec: FineTuneJobSpec,
    dataset_digest: str,
    training_arguments: dict[str, Any],
    metrics: dict[str, float],
) -> AdapterManifest:
    """The manifest for the files currently in ``adapter_dir`` (pure apart from hashing)."""
    files = hash_directory(adapter_dir)
    uri, revision = split_uri_revision(spec.base_model.uri)
    return {
        "schemaVersion": SCHEMA_VERSION,
        "baseModel": {"uri": uri, "revision": revision},
        "method": spec.method,
        "rank": spec.lora.r,
        "alpha": spec.lora.alpha,
        "targetModules": list(spec.lora.target_modules),
        "datasetDigest": dataset_digest,
        "trainingArguments": training_arguments,
        "metrics": metrics,
        "files": files,
        "digest": digest_of_files(files),
    }


def write_manifest(adapter_dir: str | Path, manifest: AdapterManifest) -> Path:
    path = Path(adapter_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def verify(adapter_dir: str | Path) -> str:
    """Recompute the digest of ``adapter_dir`` and return it; raises on any mismatch."""
    return verify_directory(adapter_dir)


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(adapter_dir).rglob("*") if p.is_file())
