"""Before a run starts: does it fit the GPU (and with which batch size and checkpointing), and
which PersistentVolumeClaims and Secrets must exist for its pod."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...api.common import ConditionStatus
from ...api.finetunejob import Estimate, FineTuneJobSpec, Reason
from ...config import OperatorConfig
from ...domain import estimator as est
from ...domain import packed_memory as packed
from ...domain.uris import StorageUri
from ...policy import quantity, trainer_resources

MODEL_SHAPE_ANNOTATION = "finetune.dev/model-shape"


@dataclass(frozen=True)
class FitResult:
    status: ConditionStatus
    reason: Reason
    message: str
    batch: int | None = None
    gradient_checkpointing: bool | None = None
    estimate: Estimate | None = None


def model_shape(
    spec: FineTuneJobSpec,
    annotations: Mapping[str, str],
    model_config: tuple[Mapping[str, Any], str] | None = None,
) -> tuple[est.ModelShape | None, str]:
    """The base model's shape from the annotation hint, the model's own ``config.json``
    (``(parsed, where)``, when the caller can read it: local mode) or the known families,
    with its source."""
    raw = annotations.get(MODEL_SHAPE_ANNOTATION)
    if not raw and model_config is not None:
        parsed, where = model_config
        try:
            return est.ModelShape.from_hf_config(dict(parsed)), f"config.json in {where}"
        except (TypeError, ValueError, KeyError) as exc:
            return None, f"config.json in {where} is not usable: {exc}"
    if raw:
        try:
            return est.shape_from_hint(
                json.loads(raw) if raw.strip().startswith(("{", '"')) else raw
            ), (f"annotation {MODEL_SHAPE_ANNOTATION}")
        except ValueError as exc:
            return None, f"annotation {MODEL_SHAPE_ANNOTATION} is not usable: {exc}"
    family = est.family_from_uri(spec.base_model.uri)
    if family is not None:
        return est.MODEL_FAMILIES[family], f"known family {family}"
    return None, "the model is not a known family"


def check_fit(
    spec: FineTuneJobSpec,
    annotations: Mapping[str, str],
    config: OperatorConfig,
    model_config: tuple[Mapping[str, Any], str] | None = None,
) -> FitResult:
    """Whether the run fits the GPU; resolves ``auto`` batch and unset checkpointing."""
    res = spec.resources
    user_batch = spec.training.batch_size if isinstance(spec.training.batch_size, int) else None
    user_gc = spec.training.gradient_checkpointing
    if res.gpus == 0:
        return FitResult(
            "Unknown",
            Reason.NO_GPU,
            "resources.gpus is 0: training runs on CPU; no GPU memory check",
        )
    shape, source = model_shape(spec, annotations, model_config)
    if shape is None:
        return FitResult(
            "Unknown",
            Reason.MODEL_SHAPE_UNKNOWN,
            f"cannot predict GPU memory: {source}. The trainer checks again with the model's "
            f"config.json; to check before scheduling, annotate the FineTuneJob with "
            f'{MODEL_SHAPE_ANNOTATION}: \'{{"family": "llama-3-8b"}}\' (known: '
            f"{', '.join(sorted(est.MODEL_FAMILIES))}) or a config.json-style object",
        )
    gpu_gib = res.gpu_memory_gi_b or est.gpu_memory_gib(
        res.gpu_product, config.gpu_memory_overrides
    )
    product = res.gpu_product or "the GPU"
    if gpu_gib is None and config.default_gpu_memory_gib > 0:
        gpu_gib = config.default_gpu_memory_gib
    if gpu_gib is None:
        why = (
            f"GPU product {res.gpu_product!r} is unknown"
            if res.gpu_product
            else "no resources.gpuProduct is set"
        )
        return FitResult(
            "Unknown",
            Reason.GPU_MEMORY_UNKNOWN,
            f"cannot check the fit: {why}; set resources.gpuMemoryGiB (or a known gpuProduct)",
        )
    if spec.training.packing:
        return check_packed_fit(spec, shape, source, gpu_gib, product, config, user_batch, user_gc)
    setup = est.TrainingSetup.from_spec(spec)
    batch, gc, estimate = est.choose_batch_and_checkpointing(
        shape,
        setup,
        gpu_gib,
        batch=user_batch,
        gradient_checkpointing=user_gc,
        headroom=config.memory_headroom,
    )
    usable = gpu_gib * (1 - config.memory_headroom)
    record = Estimate(
        peak_gi_b=estimate.peak_gib,
        gpu_memory_gi_b=round(gpu_gib, 2),
        fits=estimate.fits(gpu_gib, config.memory_headroom),
        batch_size=batch,
        gradient_checkpointing=gc,
        parameters=estimate.parameters,
        breakdown=estimate.breakdown,
    )
    if record.fits:
        return FitResult(
            "True",
            Reason.FITS,
            f"predicted peak {estimate.peak_gib:.1f} GiB per GPU of {usable:.1f} GiB usable on "
            f"{product} (batchSize {batch}, gradientCheckpointing {str(gc).lower()}; shape from {source})",
            batch,
            gc,
            record,
        )
    failing = est.TrainingSetup.from_spec(spec, micro_batch=batch, gc=gc)
    fixes = est.suggest_fixes(shape, failing, gpu_gib, headroom=config.memory_headroom)
    advice = (
        "; or ".join(str(f) for f in fixes)
        if fixes
        else "no setting of this job fits; use a GPU with more memory (resources.gpuProduct)"
    )
    return FitResult(
        "False",
        Reason.INSUFFICIENT_GPU_MEMORY,
        f"predicted peak {estimate.peak_gib:.1f} GiB per GPU exceeds {usable:.1f} GiB usable on "
        f"{product} ({gpu_gib:.1f} GiB less {config.memory_headroom:.0%} headroom). To fit: {advice}",
        batch,
        gc,
        record,
    )


def check_packed_fit(
    spec: FineTuneJobSpec,
    shape: est.ModelShape,
    source: str,
    gpu_gib: float,
    product: str,
    config: OperatorConfig,
    user_batch: int | None,
    user_gc: bool | None,
) -> FitResult:
    """The fit of a packed run: memory depends on tokens per micro-batch, not rows.

    ``auto`` batch and unset checkpointing stay unresolved in the trainer's configuration:
    on the node the trainer plans again from the memory it finds free (same model, see
    ``packed_memory``). An explicit batch means batchSize x maxSeqLength tokens; when that
    or an explicit checkpointing choice does not fit, the trainer replaces it with the
    planner's, and so does this check.
    """
    t = spec.training
    usable = gpu_gib * (1 - config.memory_headroom)
    run: dict[str, Any] = {
        "method": spec.method,
        "lora_rank": spec.lora.r,
        "optimizer": t.optimizer,
        "lora_dropout": spec.lora.dropout,
        "dropout_saves_inputs": not packed.FAST_PATH_FUSED_LORA_DROPOUT,
    }
    try:
        plan, replaced = packed.plan_or_replace(
            shape,
            gradient_checkpointing=user_gc,
            tokens_per_micro_batch=user_batch * t.max_seq_length if user_batch else None,
            max_seq_length=t.max_seq_length,
            memory_budget_gib=usable,
            host_memory_gib=trainer_memory_gib(spec, config),
            **run,
        )
    except packed.WithinPredictionMargin as exc:
        where = f"{product} ({gpu_gib:.1f} GiB less {config.memory_headroom:.0%} headroom)"
        return uncertain_packed_fit(exc.plan, spec, shape, run, gpu_gib, usable, where)
    except ValueError as exc:
        return FitResult(
            "False",
            Reason.INSUFFICIENT_GPU_MEMORY,
            f"{exc} ({product}: {gpu_gib:.1f} GiB less {config.memory_headroom:.0%} "
            "headroom; with packing the memory depends on maxSeqLength, not batchSize)",
            user_batch,
            user_gc,
        )
    note = "; the requested batchSize/gradientCheckpointing do not fit and will be replaced"
    offload = (
        f", activation offload to {plan.offload_host_bytes / packed.GIB:.1f} GiB of host memory"
        if plan.activation_offload
        else ""
    )
    record = packed_estimate(plan, shape, run, gpu_gib, user_batch)
    return FitResult(
        "True",
        Reason.FITS,
        f"predicted peak {plan.predicted_peak_gib:.1f} GiB per GPU of {usable:.1f} GiB usable on "
        f"{product} with packing ({plan.tokens_per_micro_batch} tokens per micro-batch, "
        f"gradientCheckpointing {str(plan.gradient_checkpointing).lower()}{offload}; shape from "
        f"{source}){note if replaced else ''}",
        None if replaced else user_batch,
        None if replaced else user_gc,
        record,
    )


def packed_estimate(
    plan: packed.MicroBatchPlan,
    shape: est.ModelShape,
    run: Mapping[str, Any],
    gpu_gib: float,
    user_batch: int | None,
) -> Estimate:
    """status.estimate of a packed plan; ``fits`` is false for a plan over the budget (within
    the prediction margin)."""
    breakdown = packed.peak_breakdown_bytes(
        shape,
        tokens=plan.tokens_per_micro_batch,
        gradient_checkpointing=plan.gradient_checkpointing,
        activation_offload=plan.activation_offload,
        **run,
    )
    return Estimate(
        peak_gi_b=plan.predicted_peak_gib,
        gpu_memory_gi_b=round(gpu_gib, 2),
        fits=not plan.within_prediction_margin,
        batch_size=user_batch,
        gradient_checkpointing=plan.gradient_checkpointing,
        tokens_per_micro_batch=plan.tokens_per_micro_batch,
        activation_offload=plan.activation_offload,
        parameters=shape.parameters(),
        breakdown={k: round(v / packed.GIB, 2) for k, v in breakdown.items()},
    )


def uncertain_packed_fit(
    plan: packed.MicroBatchPlan,
    spec: FineTuneJobSpec,
    shape: est.ModelShape,
    run: Mapping[str, Any],
    gpu_gib: float,
    usable: float,
    where: str,
) -> FitResult:
    """Predicted over the budget by less than the model's uncertainty: the run may fit, so it
    is not refused (Fits=Unknown); the trainer tries the smallest checkpointed micro-batch.
    The spec's batch and checkpointing are passed on unchanged: the trainer plans again."""
    offload = " and activation offload" if plan.activation_offload else ""
    qlora = "" if spec.method == "qlora" else "method qlora, "
    return FitResult(
        "Unknown",
        Reason.MEMORY_PREDICTION_UNCERTAIN,
        f"predicted peak {plan.predicted_peak_gib:.1f} GiB per GPU is over the {usable:.1f} GiB "
        f"usable on {where}, but within the memory model's "
        f"{packed.PREDICTION_MARGIN:.0%} prediction uncertainty: it may fit. The trainer will "
        f"try the smallest configuration ({plan.tokens_per_micro_batch} tokens per micro-batch "
        f"with gradient checkpointing{offload}). If it runs out of GPU memory: {qlora}a smaller "
        f"training.maxSeqLength (now {spec.training.max_seq_length}; a micro-batch is never "
        "smaller) or a GPU with more memory (resources.gpuProduct)",
        None,
        None,
        packed_estimate(plan, shape, run, gpu_gib, None),
    )


def trainer_memory_gib(spec: FineTuneJobSpec, config: OperatorConfig) -> float:
    """Each training process's part of the trainer container's memory request (its limit
    too when the job sets one; one process per GPU): what activation offload may pin a share
    of. The trainer reads the same figure."""
    memory = trainer_resources(spec, config.policy)["requests"]["memory"]
    return float(quantity(memory)) / max(1, spec.resources.gpus) / packed.GIB


def referenced_objects(spec: FineTuneJobSpec) -> tuple[list[str], list[str]]:
    """(PVC claim names, Secret names) the trainer pod needs."""
    claims: list[str] = []
    secrets: list[str] = []
    sources: list[tuple[str, Any]] = [
        (spec.base_model.uri, spec.base_model.credentials_secret_ref),
        (spec.dataset.train.uri, spec.dataset.train.credentials_secret_ref),
        (spec.output.uri, spec.output.credentials_secret_ref),
    ]
    if spec.dataset.eval is not None:
        sources.append((spec.dataset.eval.uri, spec.dataset.eval.credentials_secret_ref))
    for uri, ref in sources:
        parsed = StorageUri.parse(uri)
        if parsed.scheme == "pvc" and parsed.claim not in claims:
            claims.append(parsed.claim)
        if ref is not None and ref.name not in secrets:
            secrets.append(ref.name)
    return claims, secrets
