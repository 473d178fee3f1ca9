"""The status diff sent as a merge patch."""

from __future__ import annotations

from finetune_operator.api.status_patch import status_patch


def test_equal_status_gives_no_patch() -> None:
    status = {"phase": "Training", "progress": {"step": 3}, "conditions": [{"type": "A"}]}
    assert status_patch(status, dict(status)) == {}


def test_removed_keys_are_nulled_at_every_depth() -> None:
    current = {
        "phase": "Training",
        "progress": {"step": 3, "evalLoss": 1.2},
        "adapter": {"uri": "x"},
    }
    desired = {"phase": "Training", "progress": {"step": 4}}
    assert status_patch(current, desired) == {
        "progress": {"step": 4, "evalLoss": None},
        "adapter": None,
    }


def test_lists_are_replaced_and_foreign_keys_kept() -> None:
    current = {"conditions": [{"type": "A"}], "kopf": {"progress": {}}}
    desired = {"conditions": [{"type": "A"}, {"type": "B"}]}
    assert status_patch(current, desired) == {"conditions": [{"type": "A"}, {"type": "B"}]}
