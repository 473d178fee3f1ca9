"""Adapter folders for serving tests: the files vLLM reads plus a real manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_manifest(adapter_dir: Path, base_model: str, rank: int) -> str:
    """Write manifest.json over every file in the folder; returns the digest."""
    files = {
        p.relative_to(adapter_dir).as_posix(): "sha256:"
        + hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(adapter_dir.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel].removeprefix('sha256:')}\n".encode())
    digest = "sha256:" + h.hexdigest()
    manifest = {
        "schemaVersion": 1,
        "baseModel": {"uri": base_model, "revision": None},
        "method": "lora",
        "rank": rank,
        "files": files,
        "digest": digest,
    }
    (adapter_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return digest


def make_adapter(
    root: Path, name: str, *, rank: int = 8, base_model: str = "hf://org/tiny-base",
    config_rank: int | None = None,
) -> tuple[str, str]:  # fmt: skip
    """An adapter folder; ``config_rank`` makes adapter_config.json disagree with the manifest."""
    path = root / name
    path.mkdir(parents=True)
    config = {"r": config_rank or rank, "lora_alpha": 2 * rank, "peft_type": "LORA",
              "base_model_name_or_path": base_model.removeprefix("hf://")}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(256))
    digest = write_manifest(path, base_model, rank)
    return f"file://{path}", digest
