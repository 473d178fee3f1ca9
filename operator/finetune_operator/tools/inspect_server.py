"""``finetune-operator inspect-server FILE...``: what the operator reads from vLLM Deployments.

One JSON line per Deployment found (a file without any gives one line saying so), built by
:func:`finetune_operator.serving.vllm_server.inspect` with the ConfigMaps of the same files. The
API key itself is never printed, only where it comes from.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..serving import vllm_server


def _documents(path: str) -> list[Mapping[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    out: list[Mapping[str, Any]] = []
    for doc in docs:
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            out.extend(i for i in doc.get("items") or [] if isinstance(i, Mapping))
        elif isinstance(doc, Mapping):
            out.append(doc)
    return out


def inspect_file(
    path: str, *, container: str | None, image_patterns: Sequence[str] | None
) -> list[dict[str, Any]]:
    """The report lines for one file (raises OSError/yaml.YAMLError when unreadable)."""
    docs = _documents(path)
    configmaps = vllm_server.configmaps_from_manifests(docs)
    lines: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("kind") != "Deployment":
            continue
        name = (doc.get("metadata") or {}).get("name")
        try:
            model = vllm_server.inspect(
                doc, container=container, configmaps=configmaps, image_patterns=image_patterns
            )
            report = model.report()
        except ValueError as exc:
            report = vllm_server.ServerModel(vllm=False, problems=(str(exc),)).report()
        lines.append({"file": path, "deployment": name, **report})
    if not lines:
        report = vllm_server.ServerModel(
            vllm=False, problems=("no Deployment in this file",)
        ).report()
        lines.append({"file": path, "deployment": None, **report})
    return lines


def run(
    files: Sequence[str],
    *,
    container: str | None = None,
    image_patterns: Sequence[str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Print the lines; 0: all vLLM without problems, 1: problems or no vLLM, 2: unreadable."""
    stream = out or sys.stdout
    status = 0
    for path in files:
        try:
            lines = inspect_file(path, container=container, image_patterns=image_patterns)
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            print(json.dumps({"file": path, "error": str(exc)}), file=stream)
            status = 2
            continue
        for line in lines:
            print(json.dumps(line), file=stream)
            if status == 0 and (not line["vllm"] or line["problems"]):
                status = 1
    return status
