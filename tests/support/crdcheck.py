"""Validate manifests against the generated CRDs the way an API server would, offline.

A thin wrapper over `finetune_operator.tools.crdvalidation`, the implementation the embedded API
server and `python -m finetune_operator.tools.validate` use: strict field validation (what
`kubectl apply` asks for), defaults, metadata, the structural schema and every CEL rule,
transition rules only when an old object is given.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from finetune_operator.tools.crdvalidation import ServedVersion, served_versions

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"


@functools.cache
def _crds() -> dict[str, dict[str, Any]]:
    """The CRDs by kind, read once per process: parsing these files is most of a check's time."""
    crds = (yaml.safe_load(path.read_text()) for path in CRD_DIR.glob("*.yaml"))
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def load_crd(kind: str) -> dict[str, Any]:
    """A fresh copy of the CRD of ``kind`` (a test may change it)."""
    return copy.deepcopy(_crds()[kind])


@functools.cache
def _served(kind: str) -> ServedVersion:
    (served,) = served_versions(load_crd(kind))
    return served


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate(manifest: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """All errors `kubectl apply` would meet creating ``manifest`` (or updating ``old``)."""
    return _served(manifest.get("kind", "")).apply_errors(manifest, old)
