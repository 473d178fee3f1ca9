"""Render the Helm chart offline (helm-python-sdk, no helm binary) and index what it made."""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "finetune-operator"
CRDS_DIR = ROOT / "crds"
RELEASE = "fto"
NAMESPACE = "finetune-system"


def load_script(name: str) -> Any:
    """Import a module from scripts/ (not a package on the path)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    return dict(_render(json.dumps(values, sort_keys=True)))


@cache
def _render(values_json: str) -> tuple[tuple[str, str], ...]:
    """Rendering is pure given the chart and values; cached per values within a test run."""
    import helm_python as helm

    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(
            json.loads(values_json), name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    return tuple(sorted(rendered.items()))


def manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders with these values."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@cache
def repo_crds() -> dict[str, dict[str, Any]]:
    """The generated CRDs in crds/, by name."""
    result: dict[str, dict[str, Any]] = {}
    for path in sorted(CRDS_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        result[doc["metadata"]["name"]] = doc
    return result
