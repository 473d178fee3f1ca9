"""Check FineTuneJob / AdapterDeployment / FineTuneSchedule manifests offline, before `kubectl apply`.

Uses the same pydantic models the CRDs are generated from, so an error here is the error the
API server (or the operator) would give, with the field to change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api.adapterdeployment import AdapterDeployment
from .api.finetunejob import FineTuneJob
from .api.finetuneschedule import FineTuneSchedule

MODELS: dict[str, Any] = {
    "FineTuneJob": FineTuneJob,
    "AdapterDeployment": AdapterDeployment,
    "FineTuneSchedule": FineTuneSchedule,
}


def explain(error: ValidationError) -> list[str]:
    """One line per problem: the field path (camelCase) and what is wrong."""
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        lines.append(f"{loc or '<root>'}: {err['msg']}")
    return lines


def validate_documents(text: str) -> list[tuple[str, list[str]]]:
    """(object name, problems) for each finetune.dev document in a YAML stream."""
    results: list[tuple[str, list[str]]] = []
    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict) or doc.get("kind") not in MODELS:
            continue
        name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
        try:
            MODELS[doc["kind"]].model_validate(doc)
            results.append((name, []))
        except ValidationError as exc:
            results.append((name, explain(exc)))
    return results


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        for name, problems in validate_documents(Path(path).read_text()):
            if problems:
                failed = True
                print(f"{path}: {name}: INVALID")
                for line in problems:
                    print(f"  - {line}")
            else:
                print(f"{path}: {name}: valid")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
