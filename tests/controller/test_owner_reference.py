"""Owner references: one shape for every child the operator creates."""

from __future__ import annotations

from finetune_operator.api.common import API_VERSION, owner_reference


def test_owner_reference_makes_the_object_the_controlling_owner() -> None:
    assert owner_reference("FineTuneJob", "bot", "uid-1") == {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "name": "bot",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert API_VERSION == "finetune.dev/v1alpha1"


def test_each_call_gives_a_fresh_dict() -> None:
    first = owner_reference("AdapterDeployment", "a", "u")
    first["name"] = "changed"
    assert owner_reference("AdapterDeployment", "a", "u")["name"] == "a"
