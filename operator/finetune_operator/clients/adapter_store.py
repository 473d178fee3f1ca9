"""Read an adapter's manifest where the operator can reach it (``file://`` paths).

The digest rule is shared with the trainer (:mod:`finetune_operator.adapter_digest`);
until that module is present, a local equivalent is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..planners.adapterdeployment import LocalManifest

MANIFEST = "manifest.json"


def _local_verify(root: Path) -> str:
    """sha256 over sorted ``path\\0sha256-hex\\n`` lines of every file but the manifest,
    checked against the manifest's own list and digest."""
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    recorded = {k: str(v).removeprefix("sha256:") for k, v in (manifest.get("files") or {}).items()}
    actual: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST:
            actual[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    for rel in sorted(set(recorded) | set(actual)):
        if recorded.get(rel) != actual.get(rel):
            state = (
                "missing"
                if rel not in actual
                else "not in the manifest"
                if rel not in recorded
                else "changed"
            )
            raise ValueError(f"{rel}: {state}")
    h = hashlib.sha256()
    for rel in sorted(recorded):
        h.update(f"{rel}\0{recorded[rel]}\n".encode())
    digest = "sha256:" + h.hexdigest()
    if manifest.get("digest") != digest:
        raise ValueError(
            f"the manifest's digest {manifest.get('digest')!r} does not match its file list"
        )
    return digest


def _verify(root: Path) -> str:
    try:
        from .. import adapter_digest  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return _local_verify(root)
    return str(adapter_digest.verify_directory(root))


def read_local_manifest(uri: str) -> LocalManifest | None:
    """Digest, rank and base model of a ``file://`` adapter; None for other schemes."""
    if not uri.startswith("file://"):
        return None
    root = Path(uri[len("file://") :])
    if not (root / MANIFEST).is_file():
        return LocalManifest(missing=True, error=f"{root / MANIFEST} not found")
    try:
        digest = _verify(root)
        manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        return LocalManifest(error=str(exc))
    base = manifest.get("baseModel")
    base_uri = base.get("uri") if isinstance(base, dict) else base
    rank = manifest.get("rank")
    return LocalManifest(
        digest=digest,
        rank=int(rank) if isinstance(rank, int) else None,
        base_model=str(base_uri) if base_uri else None,
    )
