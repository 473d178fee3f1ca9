"""Validate manifests against the generated CRDs the way an API server would, offline.

A thin wrapper over `finetune_operator.crdvalidation`, the implementation the embedded API
server and `python -m finetune_operator.validate` use: strict field validation (what
`kubectl apply` asks for), defaults, metadata, the structural schema and every CEL rule,
transition rules only when an old object is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from finetune_operator.crdvalidation import served_versions

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"


def load_crd(kind: str) -> dict[str, Any]:
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise KeyError(kind)


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(manifest: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """All errors `kubectl apply` would meet creating ``manifest`` (or updating ``old``)."""
    (served,) = served_versions(load_crd(manifest.get("kind", "")))
    return served.apply_errors(manifest, old)
