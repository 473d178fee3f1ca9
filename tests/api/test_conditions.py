"""The condition helper follows the Kubernetes convention for lastTransitionTime."""

from finetune_operator.api.common import get_condition, is_condition_true, set_condition


def test_new_condition_gets_time_and_generation() -> None:
    conds = set_condition([], "Fits", "True", "Fits", "10 GiB of 80", generation=3, now="t1")
    assert conds == [
        {
            "type": "Fits",
            "status": "True",
            "reason": "Fits",
            "message": "10 GiB of 80",
            "lastTransitionTime": "t1",
            "observedGeneration": 3,
        }
    ]


def test_time_changes_only_when_status_flips() -> None:
    conds = set_condition([], "Training", "True", "Running", "step 1", now="t1")
    same = set_condition(conds, "Training", "True", "Running", "step 9", now="t2")
    assert get_condition(same, "Training")["lastTransitionTime"] == "t1"
    assert get_condition(same, "Training")["message"] == "step 9"
    flipped = set_condition(same, "Training", "False", "Completed", "done", now="t3")
    assert get_condition(flipped, "Training")["lastTransitionTime"] == "t3"
    assert not is_condition_true(flipped, "Training")


def test_setting_the_same_condition_twice_is_identical_and_does_not_mutate() -> None:
    first = set_condition([], "Validated", "True", "Valid", now="t1")
    second = set_condition(first, "Validated", "True", "Valid", now="t2")
    assert first == second
    other = set_condition(first, "Fits", "Unknown", "ModelShapeUnknown", now="t2")
    assert len(first) == 1 and [c["type"] for c in other] == ["Validated", "Fits"]
