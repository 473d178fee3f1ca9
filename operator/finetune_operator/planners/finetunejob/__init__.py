"""Decide a FineTuneJob's status and the operator's next actions from what was observed.

Pure: the handler observes (the FineTuneJob, its trainer Job and pods, the log tail, which
referenced PVCs/Secrets exist, the price table), calls :func:`plan`, then carries out the
returned actions and writes the returned status. Running :func:`plan` again on the same
observation gives the same result, which makes every handler safe to repeat.

Status is the typed ``FineTuneJobStatus`` throughout (``api.finetunejob.parse_status`` reads
the stored one); its wire form exists only where the handler writes it.

Where things are:

- ``planner``: :func:`plan`, which starts a run or follows the one recorded;
- ``observed``: what the planner is given (:class:`Observed`) and returns (:class:`Plan`);
- ``conditions``: the status being built, when a run has finished, which changes make events;
- ``preflight``: the GPU memory check (:func:`check_fit`) and the referenced objects;
- ``start``: a new run's children; ``refusals``: a child the API server did not accept;
- ``tracking``: a run under way (the trainer pod's state as one table, ``TRAINING_STATES``);
- ``verdicts``: how a run ends (failure reasons and what to change, gates, the adapter);
- ``cost``: GPU time and its price; ``trainer_objects``: readers of the Job and its pods.
"""

from __future__ import annotations

from ..events import Event
from .conditions import (
    MILESTONES,
    REFUSAL_REASONS,
    StatusDraft,
    condition,
    is_settled,
    is_terminal,
    refused_for,
    transition_events,
)
from .cost import COST_REFRESH_SECONDS, PriceTable
from .observed import Action, Observed, Outcome, Plan, spec_hash
from .planner import plan
from .preflight import (
    MODEL_SHAPE_ANNOTATION,
    FitResult,
    check_fit,
    check_packed_fit,
    model_shape,
    referenced_objects,
    trainer_memory_gib,
)
from .refusals import Refusal, child_refused, classify_refusal
from .start import RUN_FIELDS
from .trainer_objects import pod_age_key, run_generation
from .verdicts import TRAINER_REASON_ADVICE, memory_advice

__all__ = [
    "COST_REFRESH_SECONDS",
    "MILESTONES",
    "MODEL_SHAPE_ANNOTATION",
    "REFUSAL_REASONS",
    "RUN_FIELDS",
    "TRAINER_REASON_ADVICE",
    "Action",
    "Event",
    "FitResult",
    "Observed",
    "Outcome",
    "Plan",
    "PriceTable",
    "Refusal",
    "StatusDraft",
    "check_fit",
    "check_packed_fit",
    "child_refused",
    "classify_refusal",
    "condition",
    "is_settled",
    "is_terminal",
    "memory_advice",
    "model_shape",
    "plan",
    "pod_age_key",
    "referenced_objects",
    "refused_for",
    "run_generation",
    "spec_hash",
    "trainer_memory_gib",
    "transition_events",
]
