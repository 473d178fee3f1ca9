"""The adapter digest: one sha256 over every file of an adapter directory.

Shared by the trainer (which writes ``manifest.json``) and the operator (which checks an
adapter before rolling it out). Pure standard library: no torch, no network.

The digest is sha256 over the sorted lines ``<relative path>\\0<sha256 hex of the file>\\n``;
``manifest.json`` itself is left out so that it can carry the digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

MANIFEST_NAME = "manifest.json"
DIGEST_PREFIX = "sha256:"
_CHUNK = 1 << 20


class DigestMismatchError(ValueError):
    """The files of an adapter do not match its manifest."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of one file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _strip(digest: str) -> str:
    return digest[len(DIGEST_PREFIX) :] if digest.startswith(DIGEST_PREFIX) else digest


def digest_of_files(files: Mapping[str, str]) -> str:
    """``sha256:<hex>`` over a mapping of relative path -> file sha256 (with or without prefix)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{_strip(files[rel])}\n".encode())
    return DIGEST_PREFIX + h.hexdigest()


def hash_directory(
    directory: str | Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)
) -> dict[str, str]:
    """``{relative posix path: "sha256:<hex>"}`` for every regular file below ``directory``."""
    root = Path(directory)
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        files[rel] = DIGEST_PREFIX + file_sha256(path)
    return files


def verify_directory(directory: str | Path) -> str:
    """Recompute an adapter directory's digest and compare it with its manifest.

    Returns the digest. Raises ``FileNotFoundError`` without a manifest and
    ``DigestMismatchError`` naming the first difference (changed, missing or extra file, or a
    manifest whose own digest does not match its file list).
    """
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: the adapter has no manifest")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    recorded: dict[str, str] = dict(manifest.get("files") or {})
    recorded_digest = str(manifest.get("digest", ""))
    if digest_of_files(recorded) != recorded_digest:
        raise DigestMismatchError(
            f"{manifest_path}: digest {recorded_digest!r} does not match its own file list"
        )
    actual = hash_directory(root)
    for rel in sorted(set(recorded) | set(actual)):
        if rel not in actual:
            raise DigestMismatchError(f"{rel}: listed in the manifest but missing")
        if rel not in recorded:
            raise DigestMismatchError(f"{rel}: present but not listed in the manifest")
        if _strip(actual[rel]) != _strip(recorded[rel]):
            raise DigestMismatchError(f"{rel}: content differs from the manifest (sha256 changed)")
    return recorded_digest
