"""The FineTuneJob planner: observed state in, status and actions out (pure, no cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from finetune_operator.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus, status_wire
from finetune_operator.planners.finetunejob import PriceTable, plan, spec_hash
from finetune_operator.planners.progress import parse_lines, parse_result, progress_status
from support.ftj_planning import CONFIG, cond, observe, started, track, with_conditions
from support.ftj_samples import DATA_REPORT, channel, pod, progress_line, result, spec

# ---------------------------------------------------------------- start


def test_fresh_job_creates_configmap_then_job_with_the_estimate() -> None:
    p, _job, cm = started()
    assert [(a.verb, a.kind, a.name) for a in p.actions] == [
        ("create", "ConfigMap", "bot-trainer-g1"),
        ("create", "Job", "bot-train-g1"),
    ]
    assert p.status.phase == "Pending" and p.status.trainer_job == "bot-train-g1"
    assert cond(p, "Fits").status == "True"
    assert p.status.estimate.batch_size == 4 and p.status.estimate.fits is True
    assert all(c.observed_generation == 1 for c in p.status.conditions)
    config = yaml.safe_load(cm["data"]["job.yaml"])
    assert config["spec"]["training"]["batchSize"] == 4


def test_auto_batch_resolved_by_the_estimator() -> None:
    p, _job, cm = started(spec(training={"batchSize": "auto", "gradientCheckpointing": None}))
    training = yaml.safe_load(cm["data"]["job.yaml"])["spec"]["training"]
    record = p.status.estimate
    assert (training["batchSize"], training["gradientCheckpointing"]) == (
        record.batch_size,
        record.gradient_checkpointing,
    )
    # Llama-3-8B QLoRA at 2048 tokens on an H100: unchecked it needs ~32 GiB per row (measured
    # sweep, bench/results/h100-2026-11-23), and batch 64 ran out of memory in the trainer.
    assert training["gradientCheckpointing"] is True and 1 <= training["batchSize"] < 64


def test_unknown_model_shape_proceeds_with_fits_unknown() -> None:
    body = spec(baseModel={"uri": "hf://acme/house-model@v1"}, training={"batchSize": "auto"})
    p, _job, cm = started(body)
    fits = cond(p, "Fits")
    assert (fits.status, fits.reason) == ("Unknown", "ModelShapeUnknown")
    assert "finetune.dev/model-shape" in fits.message
    assert yaml.safe_load(cm["data"]["job.yaml"])["spec"]["training"]["batchSize"] == "auto"


def test_model_shape_annotation_enables_the_check() -> None:
    body = spec(baseModel={"uri": "hf://acme/house-model@v1"})
    p = plan(
        observe(
            body, annotations={"finetune.dev/model-shape": json.dumps({"family": "llama-3-8b"})}
        ),
        CONFIG,
    )
    assert cond(p, "Fits").status == "True"
    assert "annotation" in cond(p, "Fits").message


def test_unknown_gpu_product_gives_fits_unknown() -> None:
    p, _job, _cm = started(spec(resources={"gpuProduct": "ACME-X1"}))
    assert cond(p, "Fits").reason == "GPUMemoryUnknown"
    assert "gpuMemoryGiB" in cond(p, "Fits").message


def test_does_not_fit_creates_nothing_and_is_permanent() -> None:
    body = spec(
        method="lora",
        training={"batchSize": 8, "gradientCheckpointing": False},
        resources={"gpuProduct": "Tesla-T4"},
    )
    p = plan(observe(body), CONFIG)
    assert p.actions == [] and p.outcome == "permanent"
    assert cond(p, "Fits").reason == "InsufficientGPUMemory"
    assert cond(p, "Failed").status == "True"
    assert "To fit: set" in cond(p, "Fits").message


def test_missing_references_retry_without_children() -> None:
    p = plan(
        observe(missing_refs=("Secret 'hf-token' not found in namespace ns: create it",)), CONFIG
    )
    assert p.actions == [] and p.outcome == "retry"
    assert cond(p, "Validated").reason == "ReferenceNotFound"
    assert "hf-token" in cond(p, "Validated").message


def test_invalid_spec_reports_the_field() -> None:
    p = plan(observe(spec(lora={"r": 0})), CONFIG)
    assert p.outcome == "permanent" and p.actions == []
    assert "spec.lora.r" in cond(p, "Validated").message


# ---------------------------------------------------------------- tracking


def test_replanning_the_same_observation_changes_nothing() -> None:
    first, job, cm = started()
    second = track(first, job, cm)
    assert second.actions == []
    third = track(first, job, cm, status=second.status)
    assert third.status == second.status
    assert third.events == []


def test_running_pod_reports_progress_data_cost_and_price() -> None:
    first, job, cm = started()
    log = "\n".join(
        [
            "plain log line",
            channel({"type": "data", "report": DATA_REPORT}),
            progress_line(4, 10),
            "@@finetune {broken",
        ]
    )
    p = track(
        first,
        job,
        cm,
        pods=(
            pod("bot-train-g1-a", started="2026-01-01T00:00:10Z", trainer_state={"running": {}}),
        ),
        log_tail=log,
        prices=PriceTable.from_configmap_data({"NVIDIA-H100-80GB-HBM3": "4.0", "currency": "EUR"}),
    )
    assert p.status.phase == "Training"
    assert p.status.progress.step == 4 and p.status.progress.percent == 40
    assert p.status.data.pii_masked == 12
    assert status_wire(p.status)["cost"] == {
        "gpuSeconds": 3600.0,
        "pricePerGpuHour": 4.0,
        "estimatedCost": 4.0,
        "currency": "EUR",
    }
    assert p.status.started_at == "2026-01-01T00:00:10Z"
    assert cond(p, "Training").status == "True"


def test_last_step_means_evaluating() -> None:
    first, job, cm = started()
    p = track(
        first,
        job,
        cm,
        pods=(pod("p", trainer_state={"running": {}}),),
        log_tail=progress_line(10, 10),
    )
    assert p.status.phase == "Evaluating"


def test_image_pull_failure_says_to_check_image_and_credentials() -> None:
    first, job, cm = started()
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}
    p = track(
        first, job, cm, pods=(pod("p", phase="Pending", started=None, trainer_state=waiting),)
    )
    training = cond(p, "Training")
    assert training.reason == "ImagePullFailed"
    assert "ghcr.io/finetune-dev/finetune-trainer" in training.message
    assert "registry credentials" in training.message
    assert any(e.type == "Warning" and e.reason == "ImagePullFailed" for e in p.events)


def test_unschedulable_names_the_gpu_product() -> None:
    first, job, cm = started()
    scheduled = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ]
    p = track(first, job, cm, pods=(pod("p", phase="Pending", started=None, conditions=scheduled),))
    training = cond(p, "Training")
    assert training.reason == "Unschedulable"
    assert (
        "NVIDIA-H100-80GB-HBM3" in training.message
        and "Insufficient nvidia.com/gpu" in training.message
    )
    assert p.status.phase == "Pending"


def test_missing_secret_key_in_fetch_step() -> None:
    first, job, cm = started()
    init = [
        {
            "name": "fetch-model",
            "state": {
                "waiting": {
                    "reason": "CreateContainerConfigError",
                    "message": 'secret "hf-token" not found',
                }
            },
        }
    ]
    p = track(first, job, cm, pods=(pod("p", phase="Pending", init_statuses=init),))
    assert cond(p, "Training").reason == "ContainerConfigError"
    assert "fetch-model" in cond(p, "Training").message


def test_unusable_data_fails_with_the_trainers_message() -> None:
    first, job, cm = started()
    failure = result(
        ok=False,
        reason="DataUnusable",
        message="42% of rows are duplicates (limit 50%... lower dedup)",
    )
    terminated = {"terminated": {"exitCode": 3, "reason": "Error", "message": json.dumps(failure)}}
    p = track(
        first,
        with_conditions(job, "FailureTarget", "Failed", reason="PodFailurePolicy"),
        cm,
        pods=(pod("p", phase="Failed", trainer_state=terminated),),
    )
    failed = cond(p, "Failed")
    assert (failed.status, failed.reason) == ("True", "DataUnusable")
    assert "42% of rows are duplicates" in failed.message and "dataset.cleaning" in failed.message
    assert p.status.phase == "Failed"


def test_result_is_read_from_the_log_when_the_message_is_log_text() -> None:
    logs = "\n".join(
        [
            "Traceback ...",
            channel(result(ok=False, reason="OutOfMemory", message="CUDA out of memory")),
        ]
    )
    parsed = parse_result(logs, None)
    assert parsed is not None and parsed.reason == "OutOfMemory"
    assert parse_result("", logs) == parsed
    assert parse_result("not json", "no channel lines") is None


def test_deadline_exceeded_says_which_field_to_raise() -> None:
    first, job, cm = started(spec(activeDeadlineSeconds=3600))
    p = track(
        first,
        with_conditions(job, "Failed", reason="DeadlineExceeded"),
        cm,
        body_spec=spec(activeDeadlineSeconds=3600),
    )
    assert cond(p, "Failed").reason == "DeadlineExceeded"
    assert "activeDeadlineSeconds" in cond(p, "Failed").message


def test_kueue_queue_admission() -> None:
    body = spec(resources={"queueName": "team-gpus"})
    first, job, cm = started(body)
    assert first.status.phase == "Queued" and job["spec"]["suspend"] is True
    queued = track(first, job, cm, body_spec=body)
    assert queued.actions == []  # Kueue owns spec.suspend
    assert cond(queued, "Admitted").reason == "Queued"
    admitted_job = {**job, "spec": {**job["spec"], "suspend": False}}
    running = track(
        first, admitted_job, cm, body_spec=body, pods=(pod("p", trainer_state={"running": {}}),)
    )
    assert cond(running, "Admitted").status == "True" and running.actions == []
    assert running.status.phase == "Training"


def test_suspend_patches_the_job_and_resume_unpatches() -> None:
    first, job, cm = started()
    p = track(first, job, cm, body_spec=spec(suspend=True), generation=2)
    assert [(a.verb, a.body) for a in p.actions] == [("patch", {"spec": {"suspend": True}})]
    suspended_job = {**job, "spec": {**job["spec"], "suspend": True}}
    p2 = track(
        first, suspended_job, cm, body_spec=spec(suspend=True), generation=2, status=p.status
    )
    assert p2.actions == [] and p2.status.phase == "Suspended"
    p3 = track(
        first, suspended_job, cm, body_spec=spec(suspend=False), generation=3, status=p2.status
    )
    assert [(a.verb, a.body) for a in p3.actions] == [("patch", {"spec": {"suspend": False}})]


def test_mutable_fields_are_applied_to_the_running_job() -> None:
    first, job, cm = started()
    p = track(
        first, job, cm, body_spec=spec(activeDeadlineSeconds=7200, backoffLimit=6), generation=2
    )
    assert p.actions[0].body == {"spec": {"activeDeadlineSeconds": 7200, "backoffLimit": 6}}
    assert not any(a.kind == "Job" and a.verb == "create" for a in p.actions)


def test_spec_change_while_running_is_deferred_then_starts_a_new_run() -> None:
    first, job, cm = started()
    changed = spec(lora={"r": 16})
    p = track(first, job, cm, body_spec=changed, generation=2)
    assert p.actions == []
    assert cond(p, "Validated").reason == "SpecChangeDeferred"
    done = with_conditions(job, "Complete")
    finished = track(
        first,
        done,
        cm,
        body_spec=changed,
        generation=2,
        status=p.status,
        pods=(
            pod(
                "p",
                phase="Succeeded",
                trainer_state={"terminated": {"exitCode": 0, "message": json.dumps(result())}},
            ),
        ),
    )
    assert finished.status.phase == "Succeeded"
    rerun = track(first, done, cm, body_spec=changed, generation=2, status=finished.status)
    assert [a.name for a in rerun.actions] == ["bot-trainer-g2", "bot-train-g2"]
    assert rerun.status.adapter is None and rerun.status.trainer_job == "bot-train-g2"


def test_finished_job_with_unchanged_spec_is_left_alone() -> None:
    first, job, cm = started()
    done = with_conditions(job, "Complete")
    terminated = {"terminated": {"exitCode": 0, "message": json.dumps(result())}}
    finished = track(first, done, cm, pods=(pod("p", phase="Succeeded", trainer_state=terminated),))
    again = track(
        first,
        None,
        cm,
        status=finished.status,
        generation=2,
        body_spec=spec(ttlSecondsAfterFinished=5),
    )  # type: ignore[arg-type]
    assert again.actions == [] and again.status.phase == "Succeeded"
    assert again.status.adapter == finished.status.adapter


def test_vanished_job_fails_the_run_instead_of_retraining() -> None:
    first, _job, cm = started()
    p = track(first, None, cm)  # type: ignore[arg-type]
    assert cond(p, "Failed").reason == "TrainerJobMissing" and p.actions == []


def test_restarted_pods_are_counted_and_both_billed() -> None:
    first, job, cm = started()
    evicted = pod(
        "a",
        created="2026-01-01T00:00:00Z",
        phase="Failed",
        started="2026-01-01T00:00:00Z",
        trainer_state={"terminated": {"exitCode": 137, "finishedAt": "2026-01-01T00:30:00Z"}},
    )
    running = pod(
        "b",
        created="2026-01-01T00:31:00Z",
        started="2026-01-01T00:40:10Z",
        trainer_state={"running": {}},
    )
    p = track(first, job, cm, pods=(running, evicted))
    assert p.status.restarts == 1
    assert p.status.cost.gpu_seconds == 1800 + 1200
    assert p.status.phase == "Training"


def test_success_records_adapter_as_the_output_uri_and_gates() -> None:
    first, job, cm = started()
    terminated = {"terminated": {"exitCode": 0, "message": json.dumps(result())}}
    p = track(
        first,
        with_conditions(job, "Complete"),
        cm,
        pods=(pod("p", phase="Succeeded", trainer_state=terminated),),
    )
    assert p.status.adapter.uri == "pvc://adapters/support-bot/adapter"
    assert p.status.metrics == {"rougeL": 0.42, "evalLoss": 1.1}
    assert [g.metric for g in p.status.gates] == ["rougeL", "evalLoss"]
    assert cond(p, "Succeeded").status == "True" and cond(p, "GatesPassed").status == "True"
    assert p.status.completed_at == "2026-01-01T01:00:00Z"


def test_complete_job_without_result_is_a_failure_with_advice() -> None:
    first, job, cm = started()
    p = track(first, with_conditions(job, "Complete"), cm)
    assert cond(p, "Failed").reason == "ResultMissing"


def test_progress_fields_unknown_to_the_operator_are_ignored() -> None:
    (line,) = parse_lines(
        channel({"type": "progress", "step": 3, "totalSteps": 0, "loss": None, "bogus": [1]})
    )
    assert progress_status(line) == {"step": 3, "totalSteps": 0}  # no percent of 0 steps


def test_spec_hash_ignores_fields_that_may_change_mid_run() -> None:
    base = FineTuneJobSpec.model_validate(spec())
    assert spec_hash(base) == spec_hash(
        FineTuneJobSpec.model_validate(spec(suspend=True, backoffLimit=9))
    )
    assert spec_hash(base) != spec_hash(FineTuneJobSpec.model_validate(spec(lora={"r": 8})))


def _assert_round_trips(status: FineTuneJobStatus) -> None:
    """Status the planner writes survives the API model unchanged, so the CRD (generated
    from the same model) neither rejects nor prunes any of it."""
    wire = status_wire(status)
    assert FineTuneJobStatus.model_validate(wire).to_wire() == wire


def test_every_status_shape_matches_the_api_model() -> None:
    first, job, cm = started()
    _assert_round_trips(first.status)
    running = track(
        first,
        job,
        cm,
        pods=(pod("p", trainer_state={"running": {}}),),
        log_tail="\n".join(
            [
                channel(
                    {
                        "type": "data",
                        "report": {**DATA_REPORT, "tokenLengthPercentiles": {"p50": 10}},
                    }
                ),
                progress_line(4, 10),
            ]
        ),
        prices=PriceTable.from_configmap_data({"NVIDIA-H100-80GB-HBM3": "4.0"}),
    )
    _assert_round_trips(running.status)
    terminated = {
        "terminated": {"exitCode": 0, "message": json.dumps(result(baseMetrics={"rougeL": 0.1}))}
    }
    gated = spec(qualityGates=[{"metric": "rougeL", "minImprovementOverBase": 0.5}])
    done = track(
        first,
        with_conditions(job, "Complete"),
        cm,
        body_spec=gated,
        status=running.status,
        pods=(pod("p", phase="Succeeded", trainer_state=terminated),),
    )
    assert done.status.phase == "Failed"
    _assert_round_trips(done.status)
    refused = plan(
        observe(
            spec(
                method="lora",
                training={"batchSize": 8, "gradientCheckpointing": False},
                resources={"gpuProduct": "Tesla-T4"},
            )
        ),
        CONFIG,
    )
    _assert_round_trips(refused.status)


def test_a_job_going_away_reports_nothing_and_creates_nothing() -> None:
    """Deleting the namespace removes the trainer Job and the referenced PVCs and Secrets in
    no particular order: while the FineTuneJob or its namespace goes, that is no failure."""
    first, _job, _cm = started()
    vanished = plan(observe(status=first.status, job=None, going_away=True), CONFIG)
    assert vanished.status == first.status and vanished.actions == [] and vanished.events == []
    fresh = plan(observe(missing_refs=("PersistentVolumeClaim 'datasets' not found",),
                         going_away=True), CONFIG)  # fmt: skip
    assert fresh.actions == [] and fresh.events == [] and status_wire(fresh.status) == {}
    # The same observation without the deletion is a failure with a warning.
    lost = plan(observe(status=first.status, job=None), CONFIG)
    assert cond(lost, "Failed").reason == "TrainerJobMissing"
    assert [e.type for e in lost.events] == ["Warning"]


# ---------------------------------------------------------------- cost and memory advice


CPU_ONLY = {"gpus": 0, "gpuProduct": None}


def test_a_cpu_only_run_reports_no_gpu_time() -> None:
    first, job, cm = started(spec(resources=CPU_ONLY))
    running = track(
        first, job, cm, spec(resources=CPU_ONLY), pods=(pod("p", trainer_state={"running": {}}),)
    )
    assert running.status.cost is None
    assert cond(running, "Training").reason == "Running"


def _oom(body_spec: dict[str, Any], *, host: bool, **kwargs: Any) -> str:
    first, job, cm = started(body_spec, **kwargs)
    if host:
        state = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
        done = with_conditions(job, "Failed", reason="BackoffLimitExceeded")
        p = track(first, done, cm, body_spec, pods=(pod("p", phase="Failed", trainer_state=state),))
    else:
        message = json.dumps(result(ok=False, reason="OutOfMemory", message="CUDA out of memory"))
        state = {"terminated": {"exitCode": 4, "reason": "Error", "message": message}}
        done = with_conditions(job, "Failed", reason="BackoffLimitExceeded")
        p = track(first, done, cm, body_spec, pods=(pod("p", phase="Failed", trainer_state=state),))
    return str(cond(p, "Failed").message)


def test_gpu_out_of_memory_advice_offers_only_what_the_run_does_not_use() -> None:
    tight = spec(training={"maxSeqLength": 2048, "batchSize": 1, "gradientCheckpointing": True})
    advice = _oom(tight, host=False)  # qlora, batch 1, checkpointing on
    assert "method: qlora" not in advice and "gradientCheckpointing" not in advice
    assert "batchSize" not in advice
    assert "maxSeqLength (now 2048)" in advice and "resources.gpuProduct" in advice

    loose = spec(
        method="lora",
        training={"maxSeqLength": 512, "batchSize": 2, "gradientCheckpointing": False},
    )
    advice = _oom(loose, host=False)
    for offered in ("batchSize (now 2)", "gradientCheckpointing: true", "method: qlora"):
        assert offered in advice


def test_out_of_memory_advice_of_an_auto_batch_names_the_batch_chosen() -> None:
    auto = spec(training={"maxSeqLength": 2048, "batchSize": "auto", "gradientCheckpointing": None})
    first, _job, _cm = started(auto)
    chosen = first.status.estimate
    advice = _oom(auto, host=False)
    assert chosen is not None and chosen.batch_size is not None
    if chosen.batch_size > 1:
        assert f"batchSize (now {chosen.batch_size})" in advice
    assert ("gradientCheckpointing" in advice) is (chosen.gradient_checkpointing is not True)
    assert "method: qlora" not in advice


def test_host_memory_advice_depends_on_where_training_runs() -> None:
    gpu = _oom(spec(resources={"memory": "32Gi"}), host=True)
    assert (
        gpu
        == "the trainer ran out of host memory (OOMKilled). To fix: raise resources.memory (now 32Gi)"
    )
    cpu = _oom(spec(method="lora", resources={**CPU_ONLY, "memory": "16Gi"},
                    training={"batchSize": 4, "gradientCheckpointing": False}), host=True)  # fmt: skip
    for offered in ("resources.memory (now 16Gi)", "batchSize (now 4)", "gradientCheckpointing"):
        assert offered in cpu


COMPARE = {"compareWith": {"uri": "pvc://adapters/champion/adapter",
                           "digest": "sha256:" + "c" * 64}}  # fmt: skip


@pytest.mark.parametrize(
    "reported, expected",
    [
        ({"comparedMetrics": {"rougeL": 0.38, "evalLoss": 1.3}},
         {"comparedMetrics": {"rougeL": 0.38, "evalLoss": 1.3}}),
        # The trainer vouches that it timed both adapters alike (decision 2020).
        ({"comparedMetrics": {"latencyP95Ms": 410.0}, "comparedTimingComparable": True},
         {"comparedMetrics": {"latencyP95Ms": 410.0}, "comparedTimingComparable": True}),
        ({"comparedError": "fetch of s3://b/champion failed: no objects found"},
         {"comparedError": "fetch of s3://b/champion failed: no objects found"}),
        ({}, {"comparedError": "the trainer reported no compared metrics (a trainer image "
                               "without compareWith?)"}),
    ],
)  # fmt: skip
def test_the_compared_adapters_metrics_or_why_not_are_recorded_and_the_run_succeeds(
    reported: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = spec(evaluation=COMPARE)
    first, job, cm = started(body)
    terminated = {"terminated": {"exitCode": 0, "message": json.dumps(result(**reported))}}
    p = track(first, with_conditions(job, "Complete"), cm, body_spec=body,
              pods=(pod("p", phase="Succeeded", trainer_state=terminated),))  # fmt: skip
    assert cond(p, "Succeeded").status == "True"  # judged on its own gates
    wire = status_wire(p.status)
    assert {k: wire[k] for k in expected} == expected
    fields = {"comparedMetrics", "comparedError", "comparedTimingComparable"}
    assert not (fields - set(expected)) & set(wire)
    _assert_round_trips(p.status)
