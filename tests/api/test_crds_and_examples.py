"""The CRDs are generated from the models, stay in sync, and agree with them on every input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api import adapterdeployment as ad
from finetune_operator.api import finetunejob as ftj
from finetune_operator.api import finetuneschedule as fts
from finetune_operator.tools import crdgen
from pydantic import ValidationError
from support.crdcheck import CRD_DIR, ROOT, load_crd, openapi_schema, validate

INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
MODELS = {
    "FineTuneJob": ftj.FineTuneJob,
    "AdapterDeployment": ad.AdapterDeployment,
    "FineTuneSchedule": fts.FineTuneSchedule,
}
UPDATES = {"FineTuneJob": ftj.validate_update, "AdapterDeployment": ad.validate_update}


def test_checked_in_crds_match_the_models() -> None:
    rendered = crdgen.render_all()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert on_disk == rendered, "crds/ drifted from the models: run `finetune-operator crds`"


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", list(MODELS))
def test_spec_schema_is_structural_bounded_and_documented(kind: str) -> None:
    crd = load_crd(kind)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["finetune"]
    spec = openapi_schema(crd)["properties"]["spec"]
    for path, node in _walk(spec):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        assert path == "" or node.get("description") or path.endswith(("[]", "{}")), (
            f"{path}: no description"
        )
        if node.get("type") == "string":
            assert "maxLength" in node or "enum" in node, f"{path}: unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: unbounded map"
        assert not {"anyOf", "oneOf", "allOf", "$ref"} & set(node), f"{path}: not structural"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_are_valid_for_crd_and_models(path: Path) -> None:
    for doc in _docs(path):
        if doc["apiVersion"] != "finetune.dev/v1alpha1":
            continue
        assert validate(doc) == []
        MODELS[doc["kind"]].model_validate(doc)


def test_there_are_enough_invalid_cases() -> None:
    assert len(INVALID) >= 25


def _expected(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path.name} has no '# expect:' line")


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_by_crd_and_models_naming_the_field(path: Path) -> None:
    expect = _expected(path)
    docs = _docs(path)
    if len(docs) == 2:  # an update: stored object, then the change
        old, new = docs
        assert validate(old) == [], "the stored object itself must be valid"
        errors = validate(new, old=old)
        with pytest.raises(ValueError) as model_error:
            UPDATES[new["kind"]](old, new)
    else:
        (new,) = docs
        errors = validate(new)
        with pytest.raises(ValidationError) as model_error:
            MODELS[new["kind"]].model_validate(new)
    assert errors, f"{path.name}: the CRD accepted it"
    assert any(expect in e for e in errors), f"{path.name}: no CRD error names {expect!r}: {errors}"
    text = str(model_error.value)
    leaf = expect.split(".")[-1]
    assert leaf in text or leaf.lower() in text.lower(), (
        f"{path.name}: model error lacks {leaf!r}: {text}"
    )


def test_api_reference_matches_the_models() -> None:
    from finetune_operator.tools import apidoc

    assert (ROOT / "docs" / "api.md").read_text() == apidoc.render(), (
        "docs/api.md drifted: run `finetune-operator docs > docs/api.md`"
    )
