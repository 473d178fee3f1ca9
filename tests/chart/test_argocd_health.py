"""The Argo CD health checks shipped with the chart, run in Lua 5.1 (what Argo CD embeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

lua51 = pytest.importorskip("lupa.lua51")

HEALTH_DIR = (
    Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "files" / "health"
)


def run_health(script_name: str, obj: dict[str, Any]) -> tuple[str, str]:
    """Run one health script the way Argo CD does: the live object in the global `obj`."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute((HEALTH_DIR / script_name).read_text())
    return str(result["status"]), str(result["message"])


def ftj(
    phase: str | None = None,
    *,
    generation: int = 1,
    observed: int | None = 1,
    suspend: bool = False,
    conditions: list[dict[str, Any]] | None = None,
    **status: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "team-a", "generation": generation},
        "spec": {"suspend": suspend},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "conditions": conditions or [], **status}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


def adep(
    phase: str | None = None,
    *,
    generation: int = 1,
    observed: int | None = 1,
    conditions: list[dict[str, Any]] | None = None,
    **status: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "d", "namespace": "team-a", "generation": generation},
        "spec": {"adapterName": "support"},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "conditions": conditions or [], **status}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


FAILED_CONDITIONS = [
    {
        "type": "Validated",
        "status": "True",
        "reason": "SpecValid",
        "message": "spec is valid",
        "lastTransitionTime": "2026-01-01T10:00:00Z",
    },
    {
        "type": "Succeeded",
        "status": "False",
        "reason": "GatesFailed",
        "message": "rougeL 0.41 is below the minimum 0.65",
        "lastTransitionTime": "2026-01-01T11:00:00Z",
    },
]

FTJ_CASES = [
    ("no status yet", ftj(None), "Progressing", "Waiting for the operator"),
    ("pending", ftj("Pending"), "Progressing", "Pending"),
    ("queued", ftj("Queued"), "Progressing", "Queued"),
    (
        "training with progress",
        ftj("Training", progress={"step": 40, "totalSteps": 200}),
        "Progressing",
        "Training (step 40/200)",
    ),
    ("evaluating", ftj("Evaluating"), "Progressing", "Evaluating"),
    (
        "succeeded",
        ftj("Succeeded", gatesSummary="3/3 passed", adapter={"digest": "sha256:ab"}),
        "Healthy",
        "gates 3/3 passed (sha256:ab)",
    ),
    (
        "failed names the newest reason",
        ftj("Failed", conditions=FAILED_CONDITIONS),
        "Degraded",
        "GatesFailed: rougeL 0.41",
    ),
    ("failed without conditions", ftj("Failed"), "Degraded", "Job failed"),
    ("suspended phase", ftj("Suspended"), "Suspended", "Suspended"),
    ("spec.suspend while training", ftj("Training", suspend=True), "Suspended", "Suspended"),
    (
        "spec change not yet observed",
        ftj("Succeeded", generation=3, observed=2),
        "Progressing",
        "observe generation 3",
    ),
    (
        "observedGeneration missing",
        ftj("Succeeded", generation=2, observed=None),
        "Progressing",
        "observe generation 2",
    ),
    (
        "suspend set but not yet observed",
        ftj("Training", generation=2, observed=1, suspend=True),
        "Progressing",
        "observe generation 2",
    ),
    (
        "terminal success wins over suspend",
        ftj("Succeeded", suspend=True),
        "Healthy",
        "Adapter ready",
    ),
    ("unknown phase", ftj("Exploded"), "Unknown", "Exploded"),
]

ADEP_CASES = [
    ("no status yet", adep(None), "Progressing", "Waiting for the operator"),
    ("pending", adep("Pending"), "Progressing", "Pending"),
    (
        "rolling out",
        adep("Progressing", current={"revision": 2}),
        "Progressing",
        "Progressing revision 2",
    ),
    (
        "canary analysis",
        adep("Analyzing", canary={"checksPassed": 3}),
        "Progressing",
        "canary checks passed: 3",
    ),
    (
        "available",
        adep("Available", current={"revision": 4}, readyReplicas=3),
        "Healthy",
        "Serving revision 4 on 3 ready replica(s)",
    ),
    (
        "rolled back",
        adep(
            "RolledBack",
            conditions=[
                {
                    "type": "Degraded",
                    "status": "True",
                    "reason": "AnalysisFailed",
                    "message": "error rate 0.20 above 0.05",
                    "lastTransitionTime": "2026-01-01T12:00:00Z",
                }
            ],
        ),
        "Degraded",
        "RolledBack - AnalysisFailed: error rate 0.20 above 0.05",
    ),
    ("degraded", adep("Degraded"), "Degraded", "Degraded"),
    ("failed", adep("Failed"), "Degraded", "Failed"),
    (
        "not yet observed",
        adep("Available", generation=5, observed=4),
        "Progressing",
        "generation 5",
    ),
    ("unknown phase", adep("Sideways"), "Unknown", "Sideways"),
]


@pytest.mark.parametrize(
    ("obj", "want_status", "want_message"),
    [pytest.param(o, s, m, id=name) for name, o, s, m in FTJ_CASES],
)
def test_finetunejob_health(obj: dict[str, Any], want_status: str, want_message: str) -> None:
    status, message = run_health("finetunejob.lua", obj)
    assert status == want_status
    assert want_message in message


@pytest.mark.parametrize(
    ("obj", "want_status", "want_message"),
    [pytest.param(o, s, m, id=name) for name, o, s, m in ADEP_CASES],
)
def test_adapterdeployment_health(obj: dict[str, Any], want_status: str, want_message: str) -> None:
    status, message = run_health("adapterdeployment.lua", obj)
    assert status == want_status
    assert want_message in message


def test_every_phase_of_the_api_is_mapped() -> None:
    """A phase added to the API must get a deliberate health mapping, never 'Unknown'."""
    from finetune_operator.api.adapterdeployment import Phase as AdapterDeploymentPhase
    from finetune_operator.api.finetunejob import Phase as FineTuneJobPhase

    assert len(FineTuneJobPhase) == 7 and len(AdapterDeploymentPhase) > 3
    for phase in FineTuneJobPhase:
        status, _ = run_health("finetunejob.lua", ftj(phase.value))
        assert status != "Unknown", phase
    for phase in AdapterDeploymentPhase:
        status, _ = run_health("adapterdeployment.lua", adep(phase.value))
        assert status != "Unknown", phase


def ftsched(
    conditions: list[dict[str, Any]] | None,
    *,
    suspend: bool = False,
    generation: int = 1,
    observed: int = 1,
    **status: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {"name": "weekly", "namespace": "team-a", "generation": generation},
        "spec": {"schedule": "0 2 * * MON", "suspend": suspend},
    }
    if conditions is not None:
        obj["status"] = {"conditions": conditions, "observedGeneration": observed, **status}
    return obj


def sched_cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


READY = sched_cond("Ready", "True", "Scheduled")
NOT_FAILED = sched_cond("LastRunFailed", "False", "Succeeded")
CHAMPION = {"job": "weekly-29943000", "adapter": {"uri": "pvc://a/x", "digest": "sha256:ab"}}


@pytest.mark.parametrize(
    ("obj", "want_status", "want_message"),
    [
        (ftsched(None), "Progressing", "Waiting for the operator to accept the schedule"),
        (ftsched([READY], generation=2), "Progressing", "observe generation 2"),
        (ftsched([READY, NOT_FAILED], champion=CHAMPION), "Healthy", "champion weekly-29943000"),
        (ftsched([READY]), "Healthy", "no champion yet"),
        (
            ftsched([READY], active=["weekly-29953080"], champion=CHAMPION),
            "Healthy",
            "champion weekly-29943000, running weekly-29953080",
        ),
        (ftsched([READY], suspend=True, champion=CHAMPION), "Suspended", "Suspended, champion"),
        (
            ftsched([sched_cond("Ready", "False", "InvalidSpec", "hour: 25 is out of range")]),
            "Degraded",
            "InvalidSpec: hour: 25 is out of range",
        ),
        (
            ftsched([READY, sched_cond("LastRunFailed", "True", "GatesFailed", "weekly-1 failed")]),
            "Degraded",
            "Last run failed (GatesFailed): weekly-1 failed",
        ),
        (
            ftsched([sched_cond("Ready", "True", "MissedSchedule", "missed by 7200s")]),
            "Healthy",
            "no champion yet; missed by 7200s",
        ),
    ],
)
def test_finetuneschedule_health(obj: dict[str, Any], want_status: str, want_message: str) -> None:
    status, message = run_health("finetuneschedule.lua", obj)
    assert status == want_status
    assert want_message in message
