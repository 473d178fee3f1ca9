"""Schema validation of custom resources in the embedded API server (opt-in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from api.parity_cases import CHILD_FIELDS, QUOTED_SCALARS, UNKNOWN_FIELDS, body
from finetune_local import Emulator, serve
from finetune_local.schema import to_json_schema
from support.k8s_fixtures import CRD_DIR

CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"]},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": {
                        "type": "object", "required": ["size"],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1},
                            "mode": {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
                            "port": {"x-kubernetes-int-or-string": True},
                            "note": {"type": "string", "nullable": True},
                            "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    },
                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                },
            }},
        }],
    },
}  # fmt: skip


@pytest.fixture
def widgets(tmp_path: Path) -> Emulator:
    (tmp_path / "widgets.yaml").write_text(yaml.safe_dump(CRD))
    return Emulator(crd_dir=tmp_path, validate_schemas=True)


def widget(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "w", "namespace": "default"},
        "spec": spec,
    }


def test_defaults_pruning_and_dialect_conversions(widgets: Emulator) -> None:
    made = widgets.create(
        widget(size=2, port="http", note=None, unknown=1, extra={"free": {"form": True}})
    )
    assert made["spec"] == {
        "size": 2,
        "mode": "fast",
        "port": "http",
        "note": None,
        "extra": {"free": {"form": True}},
    }
    assert widgets.resource_type("wd").status_subresource


@pytest.mark.parametrize("spec, complaint", [
    ({}, "spec.size: Required value"),
    ({"size": 0}, "spec.size: Invalid value: 0: should be greater than or equal to 1"),
    ({"size": 1, "mode": "warp"}, 'spec.mode: Unsupported value: "warp": supported values: "fast", "slow"'),
    ({"size": 1, "port": 1.5}, "spec.port: 1.5 is not valid under any of the given schemas"),
])  # fmt: skip
def test_invalid_objects_are_rejected_with_422(
    widgets: Emulator, spec: dict[str, Any], complaint: str
) -> None:
    import kmock

    with pytest.raises(kmock.KubernetesError) as caught:
        widgets.create(widget(**spec))
    assert caught.value.status == 422
    assert complaint in (caught.value.message or "")


def test_updates_and_status_writes_are_validated_over_http(widgets: Emulator) -> None:
    import kubernetes.client
    from finetune_local import client_configuration
    from kubernetes.client.exceptions import ApiException

    with serve(widgets):
        api = kubernetes.client.CustomObjectsApi(
            kubernetes.client.ApiClient(client_configuration(str(widgets.url)))
        )
        api.create_namespaced_custom_object(
            "example.dev", "v1", "default", "widgets", widget(size=1)
        )
        with pytest.raises(ApiException) as caught:
            api.patch_namespaced_custom_object(
                "example.dev", "v1", "default", "widgets", "w", {"spec": {"size": -1}}
            )
        assert caught.value.status == 422
        with pytest.raises(ApiException) as caught:
            api.patch_namespaced_custom_object_status(
                "example.dev", "v1", "default", "widgets", "w", {"status": {"phase": 7}}
            )
        assert caught.value.status == 422
        ok = api.patch_namespaced_custom_object_status(
            "example.dev", "v1", "default", "widgets", "w", {"status": {"phase": "Ready"}}
        )
        assert ok["status"] == {"phase": "Ready"}


def test_nullable_and_int_or_string_conversion() -> None:
    converted = to_json_schema(
        {"type": "string", "nullable": True, "x-kubernetes-validations": [{"rule": "x"}]}
    )
    assert converted == {"type": ["string", "null"]}
    assert to_json_schema({"x-kubernetes-int-or-string": True}) == {
        "anyOf": [{"type": "integer"}, {"type": "string"}]
    }


@pytest.mark.skipif(not any(CRD_DIR.glob("*.y*ml")), reason="crds/ has not been generated yet")
@pytest.mark.emulator(validate_schemas=True)
def test_the_project_crds_load_into_the_emulator(emulator: Emulator) -> None:
    job = emulator.resource_type("ftj")
    assert job.status_subresource and job.kind == "FineTuneJob"
    assert emulator.resource_type("adep").status_subresource


# ---------------------------------------------------------------- the project's own CRDs

needs_crds = pytest.mark.skipif(
    not any(CRD_DIR.glob("*.y*ml")), reason="crds/ has not been generated yet"
)


def _refused(emulator: Emulator, body: dict[str, Any]) -> str:
    import kmock

    with pytest.raises(kmock.KubernetesError) as caught:
        emulator.create(body, keep_status=False)
    assert caught.value.status == 422
    return caught.value.message or ""


@needs_crds
@pytest.mark.emulator(validate_schemas=True)
@pytest.mark.parametrize(
    ("what", "bad", "field", "good"),
    QUOTED_SCALARS + CHILD_FIELDS,
    ids=[c[0] for c in QUOTED_SCALARS + CHILD_FIELDS],
)
def test_the_emulator_refuses_what_the_api_server_refuses(
    emulator: Emulator, what: str, bad: str, field: str, good: str
) -> None:
    message = _refused(emulator, body(bad))
    assert field in message, message
    made = emulator.create(body(good), keep_status=False)
    assert made["metadata"]["uid"]


@needs_crds
@pytest.mark.emulator(validate_schemas=True)
def test_unknown_fields_are_pruned_for_clients_without_strict_validation(
    emulator: Emulator,
) -> None:
    ((_what, bad, _field, _good),) = UNKNOWN_FIELDS
    made = emulator.create(body(bad), keep_status=False)
    assert made["spec"]["resources"]["affinity"] == {"nodeAffinity": {}}


@needs_crds
@pytest.mark.emulator(validate_schemas=True)
def test_the_emulator_checks_names_and_transition_rules(emulator: Emulator) -> None:
    assert "metadata.name" in _refused(emulator, body(name="My_Job"))
    job = body("lora: {r: 16}")
    job["status"] = {"phase": "Training", "startedAt": "2026-12-01T10:00:00Z"}
    emulator.create(job, keep_status=True)
    emulator.merge_patch("ftj", "default", "bot", {"spec": {"suspend": True}})
    import kmock

    with pytest.raises(kmock.KubernetesError) as caught:
        emulator.merge_patch("ftj", "default", "bot", {"spec": {"lora": {"r": 32}}})
    assert caught.value.status == 422
    assert "spec is frozen once training has started" in (caught.value.message or "")
