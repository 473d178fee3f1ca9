"""The fit check of packed runs: token budgets from the same model the trainer's fast path
plans with, and ``auto`` left for the trainer to resolve on the node."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.config import OperatorConfig
from finetune_operator.domain import estimator as est
from finetune_operator.domain import packed_memory as packed
from finetune_operator.planners.finetunejob import Observed, Plan, plan
from support.ftj_samples import spec

CONFIG = OperatorConfig()
NOW = datetime(2026, 1, 1, 1, 0, 10, tzinfo=UTC)
LLAMA3_8B = est.MODEL_FAMILIES["llama-3-8b"]


@pytest.fixture
def without_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain checkpointing only: the margin's zones as they are where the planner may not
    offload (offload's own zones are tested with the switch on)."""
    from finetune_operator.domain import packed_memory

    monkeypatch.setattr(packed_memory, "AUTO_ACTIVATION_OFFLOAD", False)


def planned(body: dict[str, Any]) -> tuple[Plan, dict[str, Any] | None]:
    p = plan(
        Observed(
            spec=body,
            name="bot",
            namespace="ns",
            uid="u1",
            generation=1,
            status=FineTuneJobStatus(),
            now=NOW,
        ),
        CONFIG,
    )
    cm = next((a.body for a in p.actions if a.kind == "ConfigMap"), None)
    return p, (yaml.safe_load(cm["data"]["job.yaml"])["spec"]["training"] if cm else None)


def fits(p: Plan) -> dict[str, Any]:
    return next(c for c in p.status.conditions if c.type == "Fits")


def packed_spec(**training: Any) -> dict[str, Any]:
    base = {"packing": True, "batchSize": "auto", "gradientCheckpointing": None}
    return spec(training={**base, **training})


@pytest.mark.parametrize(
    ("gpu_gib", "dropout", "tokens", "gc"),
    [
        # an H100: no recomputation; the fast path's dropout keeps no copies of its inputs,
        # so dropout 0.05 fits as many tokens as dropout 0
        (80, 0.05, 12288, False),
        (80, 0.0, 12288, False),
        # a 24 GB card (less 10% headroom): checkpointed; 32,768 tokens (21.45 GiB measured)
        # is predicted 4% over that, within the model's error, so one size smaller
        (24, 0.05, 24576, True),
    ],
)
def test_packed_auto_plans_tokens_and_leaves_auto_to_the_trainer(
    gpu_gib: float, dropout: float, tokens: int, gc: bool
) -> None:
    body = packed_spec()
    body["resources"] = {"gpus": 1, "gpuMemoryGiB": gpu_gib}
    body["lora"] = {"r": 64, "dropout": dropout}
    p, training = planned(body)
    record = p.status.estimate
    assert fits(p).status == "True" and "with packing" in fits(p).message
    assert (record.tokens_per_micro_batch, record.gradient_checkpointing) == (tokens, gc)
    # the same planner the trainer runs on the node, with the operator's headroom
    same = packed.plan_micro_batch(
        LLAMA3_8B,
        method="qlora",
        lora_rank=64,
        max_seq_length=2048,
        memory_budget_gib=gpu_gib * (1 - CONFIG.memory_headroom),
        lora_dropout=dropout,
        dropout_saves_inputs=False,
    )
    assert record.peak_gi_b == same.predicted_peak_gib <= gpu_gib * (1 - CONFIG.memory_headroom)
    assert sum(record.breakdown.values()) == pytest.approx(record.peak_gi_b, abs=0.05)
    # auto stays auto: the trainer plans from the memory it finds free
    assert training is not None
    assert training["batchSize"] == "auto" and training.get("gradientCheckpointing") is None


def test_explicit_packed_batch_is_a_token_budget() -> None:
    p, training = planned(packed_spec(batchSize=2, gradientCheckpointing=True))
    record = p.status.estimate
    assert record.tokens_per_micro_batch == 2 * 2048 and record.gradient_checkpointing is True
    assert training is not None and training["batchSize"] == 2


def test_explicit_packed_choice_that_does_not_fit_is_replaced_not_refused() -> None:
    # 16 x 2048 tokens without checkpointing needs well over 80 GB; the planner's choice fits.
    p, training = planned(packed_spec(batchSize=16, gradientCheckpointing=False))
    assert fits(p).status == "True"
    assert "will be replaced" in fits(p).message
    assert p.status.estimate.tokens_per_micro_batch < 16 * 2048
    assert training is not None  # children are made: the trainer replaces the choice too


def test_packed_run_that_cannot_fit_creates_nothing() -> None:
    body = packed_spec()
    body["method"] = "lora"
    body["baseModel"] = {"uri": "hf://meta-llama/Meta-Llama-3-70B@main"}
    body["resources"] = {"gpus": 1, "gpuProduct": "Tesla-T4"}
    p, training = planned(body)
    assert p.actions == [] and training is None and p.outcome == "permanent"
    assert fits(p).reason == "InsufficientGPUMemory"
    assert "packing" in fits(p).message and "maxSeqLength" in fits(p).message


def test_unpacked_runs_keep_the_row_estimator() -> None:
    p, training = planned(spec(training={"batchSize": "auto", "gradientCheckpointing": None}))
    assert p.status.estimate.tokens_per_micro_batch is None
    assert training is not None and isinstance(training["batchSize"], int)


def _small_gpu(memory: str, gpu_gib: float) -> tuple[Plan, dict[str, Any] | None]:
    body = packed_spec()
    body["resources"] = {"gpus": 1, "gpuMemoryGiB": gpu_gib, "memory": memory}
    return planned(body)


def test_offload_is_planned_by_itself_only_where_the_switch_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On by default (decision 2100): some small GPUs offload; switched off, none does.
    assert packed.AUTO_ACTIVATION_OFFLOAD is True

    def offloading() -> list[float]:
        return [
            g / 2
            for g in range(16, 60)
            if (est := _small_gpu("64Gi", g / 2)[0].status.estimate) is not None
            and est.activation_offload
        ]

    assert offloading()
    monkeypatch.setattr(packed, "AUTO_ACTIVATION_OFFLOAD", False)
    assert offloading() == []


def test_small_gpu_offloads_checkpointed_inputs_within_the_trainers_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packed, "AUTO_ACTIVATION_OFFLOAD", True)
    offloading = [
        (g / 2, p)
        for g in range(16, 60)
        if (est := (p := _small_gpu("64Gi", g / 2)[0]).status.estimate) is not None
        and est.activation_offload
        and est.fits  # not the GPUs over the prediction by less than its margin (below)
    ]
    assert offloading  # small GPUs with plenty of host memory offload
    for gpu_gib, p in offloading:
        record = p.status.estimate
        assert record is not None and record.tokens_per_micro_batch is not None
        assert record.breakdown is not None and record.peak_gi_b is not None
        pinned = 32 * record.tokens_per_micro_batch * 4096 * 2 / packed.GIB
        assert fits(p).status == "True"
        assert f"activation offload to {pinned:.1f} GiB of host memory" in str(fits(p).message)
        assert sum(record.breakdown.values()) == pytest.approx(record.peak_gi_b, abs=0.05)
        # the same planner the trainer runs, with the trainer container's memory request
        same = packed.plan_micro_batch(
            LLAMA3_8B, method="qlora", lora_rank=64, max_seq_length=2048,
            memory_budget_gib=gpu_gib * (1 - CONFIG.memory_headroom), host_memory_gib=64,
            dropout_saves_inputs=not packed.FAST_PATH_FUSED_LORA_DROPOUT,
        )  # fmt: skip
        assert same.activation_offload and same.predicted_peak_gib == record.peak_gi_b
        # a request of less than twice the pinned inputs: not those tokens with offload, or,
        # where checkpointing alone cannot fit, a refusal that names the memory to request
        small, training = _small_gpu(f"{int(2 * pinned * 1024) - 1}Mi", gpu_gib)
        if fits(small).status == "False":
            assert "resources.memory" in str(fits(small).message) and training is None
            continue
        smaller = small.status.estimate
        assert smaller is not None and smaller.tokens_per_micro_batch is not None
        assert (
            not smaller.activation_offload
            or smaller.tokens_per_micro_batch < record.tokens_per_micro_batch
        )
        assert training is not None and training["batchSize"] == "auto"


def test_offload_host_memory_is_shared_by_the_pods_training_processes() -> None:
    from finetune_operator.api.finetunejob import FineTuneJobSpec
    from finetune_operator.planners.finetunejob import trainer_memory_gib

    one = FineTuneJobSpec.model_validate(spec(resources={"gpus": 1, "memory": "32Gi"}))
    four = FineTuneJobSpec.model_validate(spec(resources={"gpus": 4, "memory": "32Gi"}))
    default = FineTuneJobSpec.model_validate(spec(resources={"gpus": 1}))
    assert trainer_memory_gib(one, CONFIG) == 32
    assert trainer_memory_gib(four, CONFIG) == 8
    assert trainer_memory_gib(default, CONFIG) == 4  # the platform's default request, 4Gi


# ---------------------------------------------------------------- the prediction margin


def _smallest_peak_gib() -> float:
    """The memory model's peak of the smallest packed configuration of the sample job."""
    return (
        packed.predict_peak_bytes(
            LLAMA3_8B, method="qlora", lora_rank=64, tokens=2048, gradient_checkpointing=True,
            dropout_saves_inputs=not packed.FAST_PATH_FUSED_LORA_DROPOUT,
        ) / packed.GIB
    )  # fmt: skip


def _gpu_for_usable(usable_gib: float) -> dict[str, Any]:
    return {"gpus": 1, "gpuMemoryGiB": round(usable_gib / (1 - CONFIG.memory_headroom), 2)}


@pytest.mark.parametrize("training", [{}, {"batchSize": 8, "gradientCheckpointing": False}])
@pytest.mark.usefixtures("without_offload")
def test_packed_run_over_the_prediction_by_less_than_its_margin_starts(
    training: dict[str, Any],
) -> None:
    peak = _smallest_peak_gib()
    body = packed_spec(**training)
    body["resources"] = _gpu_for_usable(peak / (1 + packed.PREDICTION_MARGIN / 2))
    usable = body["resources"]["gpuMemoryGiB"] * (1 - CONFIG.memory_headroom)
    p, trainer_training = planned(body)
    fit = fits(p)
    assert (fit.status, fit.reason) == ("Unknown", "PredictionUncertain")
    for said in (
        f"predicted peak {round(peak, 2):.1f} GiB per GPU is over the {usable:.1f} GiB usable",
        f"{body['resources']['gpuMemoryGiB']:.1f} GiB less 10% headroom",
        f"{packed.PREDICTION_MARGIN:.0%} prediction uncertainty",
        "try the smallest configuration (2048 tokens per micro-batch with gradient checkpointing)",
        "a smaller training.maxSeqLength (now 2048",
        "a GPU with more memory (resources.gpuProduct)",
    ):
        assert said in fit.message
    # status shows the numbers, marked as over the GPU
    record = p.status.estimate
    assert record is not None and record.fits is False
    assert (record.tokens_per_micro_batch, record.gradient_checkpointing) == (2048, True)
    assert record.peak_gi_b == round(peak, 2) > usable
    assert sum(record.breakdown.values()) == pytest.approx(record.peak_gi_b, abs=0.05)
    # the run goes ahead with the spec's choices, which the trainer plans again
    assert [a.kind for a in p.actions] == ["ConfigMap", "Job"]
    assert p.outcome != "permanent" and p.status.phase == "Pending"
    assert not [c for c in p.status.conditions if c.type == "Failed"]
    assert trainer_training is not None
    assert trainer_training["batchSize"] == training.get("batchSize", "auto")


@pytest.mark.usefixtures("without_offload")
def test_packed_run_clearly_over_the_prediction_margin_creates_nothing() -> None:
    peak = _smallest_peak_gib()
    body = packed_spec()
    body["resources"] = _gpu_for_usable(peak / (1 + packed.PREDICTION_MARGIN) - 0.1)
    p, training = planned(body)
    assert (fits(p).status, fits(p).reason) == ("False", "InsufficientGPUMemory")
    assert p.actions == [] and training is None and p.outcome == "permanent"
    assert p.status.estimate is None


@pytest.mark.usefixtures("without_offload")
def test_out_of_memory_after_the_margin_offers_only_the_sequence_length_or_the_gpu() -> None:
    from support.ftj_planning import cond, started, track, with_conditions
    from support.ftj_samples import pod, result

    body = packed_spec()
    body["resources"] = _gpu_for_usable(_smallest_peak_gib() / (1 + packed.PREDICTION_MARGIN / 2))
    first, job, cm = started(body)
    message = json.dumps(result(ok=False, reason="OutOfMemory", message="CUDA out of memory"))
    state = {"terminated": {"exitCode": 4, "reason": "Error", "message": message}}
    done = with_conditions(job, "Failed", reason="BackoffLimitExceeded")
    failed = track(first, done, cm, body, pods=(pod("p", phase="Failed", trainer_state=state),))
    advice = str(cond(failed, "Failed").message)
    assert (cond(failed, "Failed").reason) == "OutOfMemory"
    assert "batchSize" not in advice and "gradientCheckpointing" not in advice
    assert "maxSeqLength (now 2048)" in advice and "resources.gpuProduct" in advice


def test_the_margin_tries_offload_only_where_the_planner_may_offload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packed, "AUTO_ACTIVATION_OFFLOAD", True)
    uncertain = [
        p for g in range(10, 40) if fits(p := _small_gpu("64Gi", g / 2)[0]).status == "Unknown"
    ]
    assert uncertain  # GPUs just too small for 2,048 tokens with offload
    for p in uncertain:
        assert fits(p).reason == "PredictionUncertain"
        assert "2048 tokens per micro-batch with gradient checkpointing and activation offload" in (
            fits(p).message
        )
        record = p.status.estimate
        assert record is not None and record.activation_offload and record.fits is False
        assert [a.kind for a in p.actions] == ["ConfigMap", "Job"]
