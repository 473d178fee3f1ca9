"""Read an adapter's manifest where the operator can reach it (``file://`` paths).

The digest rule is shared with the trainer: :mod:`finetune_operator.domain.adapter_digest`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..domain.adapter_digest import verify_directory
from ..domain.uris import StorageUri
from ..planners.adapterdeployment import LocalManifest

MANIFEST = "manifest.json"


def read_local_manifest(uri: str) -> LocalManifest | None:
    """Digest, rank and base model of a ``file://`` adapter; None for other schemes."""
    parsed = StorageUri.parse(uri)
    if parsed.scheme != "file":
        return None
    root = Path(parsed.path)
    if not (root / MANIFEST).is_file():
        return LocalManifest(missing=True, error=f"{root / MANIFEST} not found")
    try:
        digest = verify_directory(root)
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
