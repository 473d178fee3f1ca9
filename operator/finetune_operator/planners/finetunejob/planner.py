"""One reconcile of a FineTuneJob as a pure function: :func:`plan` (observed, config)."""

from __future__ import annotations

from pydantic import ValidationError

from ...api.finetunejob import FineTuneJobSpec, Reason
from ...builders import names
from ...config import OperatorConfig
from .conditions import StatusDraft, is_terminal, refused_for
from .observed import Observed, Plan, spec_hash
from .start import start_run
from .tracking import track_run
from .verdicts import invalid


def plan(obs: Observed, config: OperatorConfig) -> Plan:
    """The desired status and actions for one observation."""
    if obs.going_away:
        # Children, references and the namespace disappear on purpose: nothing to report,
        # nothing to create (a status write or an event would only race the deletion).
        return Plan(obs.status.model_copy(deep=True))
    st = StatusDraft(obs.status, obs.generation, obs.now)
    try:
        spec = FineTuneJobSpec.model_validate(dict(obs.spec))
    except ValidationError as exc:
        return invalid(obs, st, Reason.INVALID_SPEC, validation_message(exc))
    current_hash = spec_hash(spec)
    recorded_job = obs.status.trainer_job
    run_hash = (
        ((obs.configmap or {}).get("metadata") or {})
        .get("annotations", {})
        .get(names.ANNOTATION_SPEC_HASH)
    )
    if obs.job is not None:
        run_hash = (
            (obs.job.get("metadata") or {})
            .get("annotations", {})
            .get(names.ANNOTATION_SPEC_HASH, run_hash)
        )

    if recorded_job is None and refused_for(obs.status, obs.generation):
        # Refused for this spec: only a spec change tries again.
        return Plan(obs.status.model_copy(deep=True))
    edited_after_verdict = (
        is_terminal(obs.status) and run_hash is not None and run_hash != current_hash
    )
    if recorded_job is None or edited_after_verdict:
        return start_run(obs, st, spec, current_hash, config)
    return track_run(obs, st, spec, current_hash, run_hash, recorded_job, config)


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"spec.{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)
