"""The Training condition of a run without a verdict, row by row of one table: what the trainer
Job and its newest pod show decides the condition and the phase; the first row that applies
wins."""

from __future__ import annotations

from dataclasses import replace

import pytest
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.planners.finetunejob.tracking import TRAINING_STATES, RunView, training_state
from finetune_operator.planners.finetunejob.trainer_objects import PodView
from support.ftj_samples import spec

SPEC = FineTuneJobSpec.model_validate(spec())
WAITING = RunView(
    spec=SPEC,
    job_name="bot-train-g1",
    image="ghcr.io/acme/trainer:1",
    pod=PodView(),
    pods=0,
    suspended=False,
    queue=None,
)
RUNNING = PodView(phase="Running", running=True)
IMAGE_PULL = PodView(
    waiting_reason="ImagePullBackOff", waiting_message="not found", waiting_container="trainer"
)
CONFIG_ERROR = PodView(
    waiting_reason="CreateContainerConfigError",
    waiting_message='secret "hf-token" not found',
    waiting_container="trainer",
)
EXITED = PodView(terminated={"reason": "Error", "exitCode": 1})

# (case, what is seen, row, Training status, reason, phase, words of the message)
CASES = [
    ("suspended, no queue", replace(WAITING, suspended=True, pods=1, pod=RUNNING),
     "paused", "False", "Suspended", "Suspended", "resumes from the last checkpoint"),
    ("suspended by Kueue", replace(WAITING, suspended=True, queue="team-a"),
     "queued", "False", "Queued", "Queued", "waiting for admission"),
    ("no node fits", replace(WAITING, pod=PodView(unschedulable="0/3 nodes: Insufficient GPU")),
     "unschedulable", "False", "Unschedulable", "Pending", "1 free GPU(s) of product"),
    ("image not pulled", replace(WAITING, pod=IMAGE_PULL, pods=1),
     "image pull failed", "False", "ImagePullFailed", "Pending", "ghcr.io/acme/trainer:1"),
    ("secret missing", replace(WAITING, pod=CONFIG_ERROR, pods=1),
     "container config error", "False", "ContainerConfigError", "Pending", "hf-token"),
    ("all steps trained", replace(WAITING, pod=RUNNING, pods=1, step=10, total_steps=10),
     "trained, evaluating", "False", "Completed", "Evaluating", "trained 10 steps"),
    ("training", replace(WAITING, pod=RUNNING, pods=1, step=4, total_steps=10),
     "running", "True", "Running", "Training", "(step 4/10)"),
    ("training, no progress yet", replace(WAITING, pod=RUNNING, pods=1),
     "running", "True", "Running", "Training", "trainer pod is running"),
    ("trainer exited, Job retries", replace(WAITING, pod=EXITED, pods=1),
     "restarting", "False", "Restarting", "Training", "exit code 1"),
    ("no pod yet", WAITING,
     "pending", "False", "Pending", "Pending", "bot-train-g1 is waiting for its pod"),
    # Order matters: a paused run reports the pause even while its last pod cannot schedule.
    ("suspended and unschedulable",
     replace(WAITING, suspended=True, pod=PodView(unschedulable="no GPU")),
     "paused", "False", "Suspended", "Suspended", "paused"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("seen", "row", "status", "reason", "phase", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_training_condition_follows_the_first_row_that_applies(
    seen: RunView, row: str, status: str, reason: str, phase: str, words: str
) -> None:
    state = training_state(seen)
    assert (state.name, state.status, state.reason, state.phase) == (row, status, reason, phase)
    assert words in state.message(seen)


def test_every_row_of_the_table_is_reached() -> None:
    reached = {training_state(case[1]).name for case in CASES}
    assert reached == {row.name for row in TRAINING_STATES}
    assert TRAINING_STATES[-1].applies(WAITING)  # the last row catches every other state


def test_only_a_trained_run_also_reports_evaluation() -> None:
    assert [row.name for row in TRAINING_STATES if row.evaluating] == ["trained, evaluating"]
