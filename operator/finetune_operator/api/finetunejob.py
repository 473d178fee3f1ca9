"""FineTuneJob (finetune.dev/v1alpha1): the spec a user applies and the status the operator writes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from .common import (
    ApiModel,
    Condition,
    SecretKeyRef,
    StatusModel,
    cel,
)
from .metrics_catalog import MetricName
from .scheduling import (
    DNS_SUBDOMAIN_MAX,
    DNS_SUBDOMAIN_PATTERN,
    LABEL_VALUE_MAX,
    NONEMPTY_LABEL_VALUE_PATTERN,
    Affinity,
    LabelKey,
    LabelValue,
    Toleration,
    check_label_map,
    label_map_rules,
)

KIND = "FineTuneJob"
PLURAL = "finetunejobs"

# URIs: a scheme we can fetch from, no parent-directory segments, no whitespace.
MODEL_URI_PATTERN = r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?|file:///[^\s]*)$"
DATA_URI_PATTERN = r"^(hf://datasets/[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?(/[^\s]*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?|file:///[^\s]*)$"
# Adapters: where outputs are written, plus Hugging Face repositories (served or compared).
ADAPTER_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?|file:///[^\s]*|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?)$"
DIGEST_PATTERN = r"^sha256:[a-f0-9]{64}$"
OUTPUT_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?|file:///[^\s]*)$"
URI_MAX = 1024
NO_DOTDOT_RULE = "!self.matches('(^|/)[.][.](/|$)')"
# A bucket named like an IP address would make some S3 clients talk to that host (e.g. the
# cloud metadata endpoint); S3 itself forbids such bucket names.
NO_IP_BUCKET_RULE = "!self.matches('^s3://[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+([/:]|$)')"
URI_RULES: list[JsonValue] = [
    {"rule": NO_DOTDOT_RULE, "message": "must not contain '..' path segments"},
    {"rule": NO_IP_BUCKET_RULE, "message": "s3 bucket must be a bucket name, not an IP address"},
]

Method = Literal["qlora", "lora"]
DataFormat = Literal["auto", "prompt-completion", "instruction", "messages"]
PiiKind = Literal["email", "phone", "nationalId", "creditCard"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Optimizer = Literal[
    "paged_adamw_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
]
ComputeDtype = Literal["bfloat16", "float16", "float32"]


def check_uri(uri: str) -> str:
    """Python side of URI_RULES: no parent-directory segments, no IP-address buckets."""
    if ".." in uri.split("/"):
        raise ValueError("must not contain '..' path segments")
    if re.match(r"^s3://[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+([/:]|$)", uri):
        raise ValueError("s3 bucket must be a bucket name, not an IP address")
    return uri


def _uri_field(pattern: str, description: str) -> Any:
    return Field(
        min_length=1,
        max_length=URI_MAX,
        pattern=pattern,
        description=description,
        json_schema_extra={"x-kubernetes-validations": URI_RULES},
    )


class ModelSource(ApiModel):
    """Where the base model comes from."""

    uri: str = _uri_field(
        MODEL_URI_PATTERN,
        "Base model: hf://org/name@revision, pvc://claim/path, s3://bucket/path or file:///path. "
        "Pin a revision for reproducible runs.",
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret with HF_TOKEN or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for fetching "
        "the model. Mounted into the fetch step only; never copied.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the repository to run. Off by default."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSource:
        check_uri(self.uri)
        return self


class DataSource(ApiModel):
    """A dataset file or folder: JSONL, JSON, Parquet, or a datasets save_to_disk folder."""

    uri: str = _uri_field(
        DATA_URI_PATTERN,
        "Data location: pvc://claim/path, s3://bucket/path, hf://datasets/org/name or file:///path.",
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with credentials for fetching this data. Never copied."
    )

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        check_uri(self.uri)
        return self


class PiiMasking(ApiModel):
    """Masking of personal data before training."""

    enabled: bool = Field(default=True, description="Replace personal data with placeholders.")
    kinds: list[PiiKind] = Field(
        default=["email", "phone", "nationalId", "creditCard"],
        max_length=4,
        description="Which kinds of personal data to mask.",
    )


class Cleaning(ApiModel):
    """Row filters applied before training; every dropped row is counted by reason."""

    dedup: bool = Field(
        default=True, description="Drop rows whose normalised content was seen before."
    )
    pii_mask: PiiMasking = Field(default_factory=PiiMasking, description="Personal-data masking.")
    min_tokens: int = Field(
        default=2, ge=0, le=1_000_000, description="Drop rows with fewer tokens than this."
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Drop rows with more tokens than this (default: training.maxSeqLength).",
    )
    max_duplicate_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Fail before training when a larger share of rows are duplicates.",
    )
    min_rows: int = Field(
        default=8,
        ge=1,
        le=100_000_000,
        description="Fail before training when fewer training rows remain.",
    )
    max_dropped_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Fail before training when a larger share of the rows read is dropped "
        "(invalid, another format, too long or short, too large, too deep; duplicates have "
        "maxDuplicateRate).",
    )


class DatasetSpec(ApiModel):
    """Training data, its format and cleaning."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!(has(self.eval) && has(self.evalSplit))",
                "dataset.eval and dataset.evalSplit are mutually exclusive: set one",
                ".evalSplit",
            ),
        )
    )

    train: DataSource = Field(description="Training data.")
    eval: DataSource | None = Field(
        default=None, description="Evaluation data. When absent, evalSplit of train is held out."
    )
    eval_split: float | None = Field(
        default=None,
        gt=0.0,
        lt=0.5,
        description="Share of train held out for evaluation when no eval data is given (default 0.1).",
    )
    format: DataFormat = Field(
        default="auto",
        description="Row format: prompt-completion, instruction (instruction/input/output), messages "
        "(chat), or auto to detect it.",
    )
    chat_template: str | None = Field(
        default=None,
        max_length=32768,
        description="Jinja chat template to use instead of the base model's.",
    )
    completion_only: bool = Field(
        default=True, description="Compute the loss on completion (assistant) tokens only."
    )
    cleaning: Cleaning = Field(
        default_factory=Cleaning, description="Row cleaning and data-quality limits."
    )

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("dataset.eval and dataset.evalSplit are mutually exclusive: set one")
        return self


class LoraSpec(ApiModel):
    """LoRA adapter shape."""

    r: int = Field(default=16, ge=1, le=512, description="Rank of the adapter matrices.")
    alpha: int = Field(
        default=32, ge=1, le=4096, description="Scaling numerator (scale = alpha / r)."
    )
    dropout: float = Field(
        default=0.05, ge=0.0, le=0.9, description="Dropout on the adapter input."
    )
    target_modules: list[
        Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.*-]+$")]
    ] = Field(
        default=["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt, or [all-linear] for every linear layer but the output head.",
    )


class QuantizationSpec(ApiModel):
    """4-bit quantisation of the frozen base weights (QLoRA only)."""

    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(
        default=True, description="Also quantise the quantisation constants."
    )
    compute_dtype: ComputeDtype = Field(
        default="bfloat16", description="Dtype of the matmuls (bfloat16 on GPU; float32 on CPU)."
    )


# An int-or-string in the CRD (`kubectl explain` and clients see both types); the bounds
# apply to integers and the pattern to strings, as the API server applies them.
BatchSize = Annotated[
    Annotated[int, Field(ge=1, le=4096)] | Literal["auto"],
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "minimum": 1,
            "maximum": 4096,
            "pattern": "^auto$",
        }
    ),
]


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    epochs: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="Passes over the training data."
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Stop after this many optimiser steps (overrides epochs).",
    )
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    scheduler: Scheduler = Field(default="cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(
        default=0.03, ge=0.0, le=0.5, description="Share of steps used for warm-up."
    )
    max_seq_length: int = Field(
        default=2048, ge=16, le=131072, description="Longest sequence in tokens."
    )
    batch_size: BatchSize = Field(
        default="auto",
        description="Per-device micro-batch: an integer from 1 to 4096, or the string auto to "
        "take the largest that fits the GPU (int-or-string).",
    )
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches per optimiser step."
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations to save memory. Leave unset to let the estimator decide.",
    )
    optimizer: Optimizer = Field(default="paged_adamw_8bit", description="Optimiser.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="Weight decay.")
    max_grad_norm: float = Field(
        default=1.0, ge=0.0, le=1000.0, description="Gradient clipping (0 disables)."
    )
    packing: bool = Field(
        default=False, description="Pack several rows into each sequence, keeping row boundaries."
    )
    seed: int = Field(
        default=42, ge=0, le=2**31 - 1, description="Seed for data order, split and init."
    )
    checkpoint_every_steps: int = Field(
        default=100, ge=1, le=1_000_000, description="Save a resumable checkpoint this often."
    )
    logging_every_steps: int = Field(
        default=10, ge=1, le=100_000, description="Log loss this often."
    )


class ResourcesSpec(ApiModel):
    """Where and on what the trainer runs."""

    gpus: int = Field(default=1, ge=0, le=16, description="GPUs per node (0 trains on CPU).")
    nodes: int = Field(default=1, ge=1, le=64, description="Nodes for data-parallel training.")
    gpu_product: str | None = Field(
        default=None,
        max_length=LABEL_VALUE_MAX,
        pattern=NONEMPTY_LABEL_VALUE_PATTERN,
        description="GPU model, e.g. NVIDIA-H100-80GB-HBM3 (node label nvidia.com/gpu.product, "
        "so a label value). Used for scheduling and for the memory fit check.",
    )
    gpu_memory_gi_b: float | None = Field(
        default=None,
        alias="gpuMemoryGiB",
        gt=0.0,
        le=4096.0,
        description="Memory of one GPU in GiB, when gpuProduct is unknown to the operator.",
    )
    cpu: str | None = Field(
        default=None, max_length=32, pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request."
    )
    memory: str | None = Field(
        default=None,
        max_length=32,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        description="Memory request.",
    )
    node_selector: Annotated[dict[LabelKey, LabelValue], AfterValidator(check_label_map)] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the trainer pod requires (label keys and label values).",
        json_schema_extra=label_map_rules(),
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Pod tolerations."
    )
    affinity: Affinity | None = Field(
        default=None,
        description="Pod affinity (core/v1 Affinity) of the trainer pods, with bounded lists.",
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=DNS_SUBDOMAIN_MAX,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="PriorityClass of the trainer pods (a DNS subdomain).",
    )
    queue_name: str | None = Field(
        default=None,
        max_length=LABEL_VALUE_MAX,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Kueue LocalQueue; the trainer Job is then admitted by Kueue. It becomes the "
        "kueue.x-k8s.io/queue-name label, so at most 63 characters.",
    )


class OutputSpec(ApiModel):
    """Where the adapter is written."""

    uri: str = _uri_field(
        OUTPUT_URI_PATTERN, "Output location: pvc://claim/path, s3://bucket/path or file:///path."
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with credentials for writing to s3://. Never copied."
    )
    merge_and_unload: bool = Field(
        default=False,
        description="Also write a merged full model (merged against the unquantised base).",
    )
    merged_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Dtype of the merged model."
    )

    @model_validator(mode="after")
    def _check(self) -> OutputSpec:
        check_uri(self.uri)
        return self


class QualityGate(ApiModel):
    """One condition the adapter must meet to be released."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.min) || has(self.max) || has(self.minImprovementOverBase)",
                "set at least one of min, max, minImprovementOverBase",
                ".metric",
            ),
            (
                "!(has(self.min) && has(self.max)) || self.min < self.max",
                "min must be less than max",
                ".min",
            ),
        )
    )

    metric: MetricName = Field(
        description="Metric name, e.g. rougeL, evalLoss, jsonValidity, latencyP95Ms."
    )
    min: float | None = Field(default=None, description="Pass when value >= min.")
    max: float | None = Field(default=None, description="Pass when value <= max.")
    min_improvement_over_base: float | None = Field(
        default=None,
        ge=0.0,
        description="Pass when the adapter beats the base model by at least this much "
        "(in the metric's better direction). Evaluates the base model too.",
    )

    @model_validator(mode="after")
    def _check(self) -> QualityGate:
        if self.min is None and self.max is None and self.min_improvement_over_base is None:
            raise ValueError("qualityGates[]: set at least one of min, max, minImprovementOverBase")
        for name in ("min", "max"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"qualityGates[].{name} must be a finite number")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError("qualityGates[]: min must be less than max")
        return self


class CompareWith(ApiModel):
    """Another adapter evaluated on the same eval rows as the trained one (e.g. the adapter in
    production). Its metrics go to ``status.comparedMetrics``; when it cannot be fetched or
    loaded, the run still ends on its own gates and ``status.comparedError`` says why."""

    uri: str = _uri_field(
        ADAPTER_URI_PATTERN,
        "Adapter folder: pvc://claim/path, s3://bucket/path, hf://org/name@revision or "
        "file:///path. It must be a LoRA adapter for the same base model, with its "
        "manifest.json.",
    )
    digest: str = Field(
        pattern=DIGEST_PATTERN,
        max_length=71,
        description="sha256:<hex> of the adapter's manifest: the files evaluated must match it.",
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret with credentials for fetching an s3:// or hf:// adapter. Mounted "
        "into its fetch step only; never copied.",
    )

    @model_validator(mode="after")
    def _check(self) -> CompareWith:
        check_uri(self.uri)
        return self


class EvaluationSpec(ApiModel):
    """How the adapter is evaluated after training."""

    max_new_tokens: int = Field(
        default=128, ge=1, le=8192, description="Generation budget per eval row."
    )
    batch_size: int = Field(default=8, ge=1, le=1024, description="Rows generated together.")
    max_samples: int = Field(
        default=256, ge=1, le=100_000, description="Eval rows used for generation metrics."
    )
    latency_requests: int = Field(
        default=16,
        ge=0,
        le=256,
        description=(
            "Eval rows generated one at a time (batch 1) and timed for latencyP50Ms, "
            "latencyP95Ms and tokensPerSecond; 0 skips the timing."
        ),
    )
    compare_with_base: bool = Field(
        default=False,
        description="Also evaluate the base model (implied by any minImprovementOverBase gate).",
    )
    refusal_markers: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        max_length=64,
        description="Phrases that count as a refusal (default: English and Korean phrasings).",
    )
    compare_with: CompareWith | None = Field(
        default=None,
        description="Also evaluate this adapter on the same eval rows (a FineTuneSchedule with "
        "promotion BeatChampion sets it to its champion).",
    )


LATENCY_GATE_MESSAGE = (
    "evaluation.latencyRequests: 0 times no request, so a gate on latencyP50Ms, latencyP95Ms "
    "or tokensPerSecond could never pass (raise latencyRequests or remove the gate)"
)


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on which data, how, and what the result must achieve."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.quantization) || self.method == 'qlora'",
                "quantization: only allowed with method qlora (remove it or set method: qlora)",
                ".quantization",
            ),
            (
                "!has(self.evaluation) || !has(self.evaluation.latencyRequests)"
                " || self.evaluation.latencyRequests > 0 || !has(self.qualityGates)"
                " || !self.qualityGates.exists(g, g.metric in"
                " ['latencyP50Ms', 'latencyP95Ms', 'tokensPerSecond'])",
                LATENCY_GATE_MESSAGE,
                ".evaluation.latencyRequests",
            ),
        )
    )

    base_model: ModelSource = Field(description="The model to adapt.")
    dataset: DatasetSpec = Field(description="Training and evaluation data.")
    method: Method = Field(default="qlora", description="qlora (4-bit base) or lora (16-bit base).")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape.")
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="4-bit settings; only with method qlora (defaults apply when unset).",
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Optimisation settings."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Hardware and scheduling."
    )
    output: OutputSpec = Field(description="Where the adapter is written.")
    quality_gates: list[QualityGate] = Field(
        default_factory=list, max_length=32, description="Conditions the adapter must meet."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Evaluation settings."
    )
    suspend: bool = Field(
        default=False, description="Pause training (resumes from the last checkpoint)."
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Trainer failures tolerated (evictions and preemptions do not count).",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, le=30 * 24 * 3600, description="Stop the trainer after this long."
    )
    ttl_seconds_after_finished: int = Field(
        default=86400,
        ge=0,
        le=30 * 24 * 3600,
        description="Delete the finished trainer Job after this long.",
    )
    image: str | None = Field(
        default=None, max_length=512, pattern=r"^[^\s]+$", description="Trainer image override."
    )

    @model_validator(mode="after")
    def _check(self) -> FineTuneJobSpec:
        if self.quantization is not None and self.method != "qlora":
            raise ValueError(
                "quantization: only allowed with method qlora (remove it or set method: qlora)"
            )
        timed = {"latencyP50Ms", "latencyP95Ms", "tokensPerSecond"}
        if self.evaluation.latency_requests == 0 and any(
            g.metric in timed for g in self.quality_gates
        ):
            raise ValueError(LATENCY_GATE_MESSAGE)
        return self

    def resolved_quantization(self) -> QuantizationSpec | None:
        """The quantisation in force: defaults for qlora, none for lora."""
        if self.method != "qlora":
            return None
        return self.quantization or QuantizationSpec()

    def needs_base_metrics(self) -> bool:
        return self.evaluation.compare_with_base or any(
            g.min_improvement_over_base is not None for g in self.quality_gates
        )


# ---------------------------------------------------------------- status


class Progress(StatusModel):
    step: int | None = Field(default=None, description="Optimiser steps done.")
    total_steps: int | None = Field(default=None, description="Optimiser steps planned.")
    percent: int | None = Field(default=None, description="step / totalSteps in percent.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    eta_seconds: int | None = Field(
        default=None, description="Estimated seconds to the end of training."
    )
    gpu_memory_gi_b: float | None = Field(
        default=None, alias="gpuMemoryGiB", description="Peak GPU memory so far."
    )
    updated_at: str | None = Field(
        default=None, max_length=64, description="When the trainer last reported."
    )


class Estimate(StatusModel):
    peak_gi_b: float | None = Field(
        default=None, alias="peakGiB", description="Predicted peak GPU memory per GPU."
    )
    gpu_memory_gi_b: float | None = Field(
        default=None, alias="gpuMemoryGiB", description="Memory of the GPU it runs on."
    )
    fits: bool | None = Field(
        default=None,
        description=(
            "Whether the prediction fits the GPU. false with Fits=Unknown (PredictionUncertain): "
            "over, but within the memory model's uncertainty; the run goes ahead."
        ),
    )
    batch_size: int | None = Field(
        default=None, description="Micro-batch in force (chosen when auto)."
    )
    gradient_checkpointing: bool | None = Field(
        default=None, description="Checkpointing in force (chosen when auto)."
    )
    tokens_per_micro_batch: int | None = Field(
        default=None,
        description=(
            "With packing: tokens per packed micro-batch the trainer is expected to use on "
            "this GPU (it plans again from the memory it finds free)."
        ),
    )
    activation_offload: bool | None = Field(
        default=None,
        description=(
            "With packing: whether the checkpointed layer inputs are expected to wait in host "
            "memory (chosen when that allows a much larger micro-batch and fits the trainer's "
            "memory request)."
        ),
    )
    parameters: int | None = Field(default=None, description="Base model parameters.")
    breakdown: dict[str, float] | None = Field(default=None, description="GiB by component.")


class DataReport(StatusModel):
    rows_read: int | None = Field(default=None, description="Rows read from the source.")
    rows_kept: int | None = Field(default=None, description="Rows left after cleaning.")
    train_rows: int | None = Field(default=None, description="Rows used for training.")
    eval_rows: int | None = Field(default=None, description="Rows used for evaluation.")
    duplicates: int | None = Field(default=None, description="Rows dropped as duplicates.")
    duplicate_rate: float | None = Field(default=None, description="duplicates / rowsRead.")
    pii_masked: int | None = Field(default=None, description="Personal-data spans masked.")
    dropped: dict[str, int] | None = Field(default=None, description="Rows dropped, by reason.")
    digest: str | None = Field(
        default=None, max_length=128, description="sha256 of the cleaned data."
    )


class GateResult(StatusModel):
    metric: str = Field(max_length=64, description="Metric the gate checks.")
    threshold: str = Field(
        default="", max_length=256, description="The gate as written, e.g. '>= 0.65'."
    )
    value: float | None = Field(
        default=None, description="Measured value (absent when missing or NaN)."
    )
    base_value: float | None = Field(default=None, description="Base model's value, when compared.")
    passed: bool = Field(description="Whether the gate passed.")
    reason: str = Field(default="", max_length=1024, description="Why it failed, when it failed.")


class AdapterRecord(StatusModel):
    uri: str = Field(max_length=URI_MAX, description="Where the adapter lives.")
    digest: str = Field(
        max_length=128, description="sha256 over the adapter's files (manifest digest)."
    )
    rank: int | None = Field(default=None, description="LoRA rank.")
    size_bytes: int | None = Field(default=None, description="Total size of the adapter files.")
    base_model: str | None = Field(
        default=None, max_length=URI_MAX, description="Base model it was trained on."
    )
    method: str | None = Field(default=None, max_length=16, description="qlora or lora.")
    merged_uri: str | None = Field(
        default=None, max_length=URI_MAX, description="Merged model, when written."
    )


class Cost(StatusModel):
    gpu_seconds: float | None = Field(
        default=None, description="GPU-seconds consumed by trainer pods."
    )
    estimated_cost: float | None = Field(
        default=None, description="gpuSeconds priced from the operator's table."
    )
    currency: str | None = Field(
        default=None, max_length=8, description="Currency of estimatedCost."
    )
    price_per_gpu_hour: float | None = Field(default=None, description="Price used.")


class Phase(StrEnum):
    """status.phase: a summary for display (automation reads the conditions)."""

    PENDING = "Pending"
    QUEUED = "Queued"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


# Kept for readers of the old name: the phases as a type.
FineTuneJobPhase = Phase


class ConditionType(StrEnum):
    """The FineTuneJob's conditions, in the order they appear in status."""

    VALIDATED = "Validated"
    FITS = "Fits"
    ADMITTED = "Admitted"
    TRAINING = "Training"
    EVALUATED = "Evaluated"
    GATES_PASSED = "GatesPassed"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """Every reason the operator writes into a FineTuneJob condition (each one is explained
    in docs/troubleshooting.md). A trainer may report a failure reason of its own as well."""

    # Validated
    VALID = "Valid"
    INVALID_SPEC = "InvalidSpec"
    UNSUPPORTED_SPEC = "UnsupportedSpec"
    REFERENCE_NOT_FOUND = "ReferenceNotFound"
    SPEC_CHANGE_DEFERRED = "SpecChangeDeferred"
    POLICY_VIOLATION = "PolicyViolation"
    # Fits
    FITS = "Fits"
    NO_GPU = "NoGPU"
    MODEL_SHAPE_UNKNOWN = "ModelShapeUnknown"
    GPU_MEMORY_UNKNOWN = "GPUMemoryUnknown"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    MEMORY_PREDICTION_UNCERTAIN = "PredictionUncertain"
    # Admitted
    NO_QUEUE = "NoQueue"
    QUEUED = "Queued"
    ADMITTED = "Admitted"
    SUSPENDED = "Suspended"
    SUSPEND_NOT_SUPPORTED_WITH_QUEUE = "SuspendNotSupportedWithQueue"
    # Training
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    COMPLETED = "Completed"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    TRAINER_JOB_MISSING = "TrainerJobMissing"
    # Evaluated, GatesPassed, Succeeded
    EVALUATING = "Evaluating"
    EVALUATED = "Evaluated"
    NO_METRICS = "NoMetrics"
    GATES_PASSED = "GatesPassed"
    NO_GATES = "NoGates"
    GATES_FAILED = "GatesFailed"
    SUCCEEDED = "Succeeded"
    # How a run failed
    OUT_OF_MEMORY = "OutOfMemory"
    OOM_KILLED = "OOMKilled"
    DATA_UNUSABLE = "DataUnusable"
    DATA_NOT_FOUND = "DataNotFound"
    MODEL_NOT_FOUND = "ModelNotFound"
    INVALID_CONFIG = "InvalidConfig"
    TRAINING_FAILED = "TrainingFailed"
    EVALUATION_FAILED = "EvaluationFailed"
    UPLOAD_FAILED = "UploadFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    POD_FAILED = "PodFailed"
    RESULT_MISSING = "ResultMissing"
    TRAINER_OUTPUT_INVALID = "TrainerOutputInvalid"
    # The API server refused a child of the run
    QUOTA_EXCEEDED = "QuotaExceeded"
    ADMISSION_DENIED = "AdmissionDenied"
    CHILD_INVALID = "ChildInvalid"
    CHILD_FORBIDDEN = "ChildForbidden"
    CHILD_NAME_TAKEN = "ChildNameTaken"
    JOB_REJECTED = "JobRejected"


# The reasons a Failed=True condition carries (metrics count each from zero).
FAILURE_REASONS = frozenset(
    {
        Reason.INVALID_SPEC,
        Reason.UNSUPPORTED_SPEC,
        Reason.POLICY_VIOLATION,
        Reason.INSUFFICIENT_GPU_MEMORY,
        Reason.TRAINER_JOB_MISSING,
        Reason.GATES_FAILED,
        Reason.OUT_OF_MEMORY,
        Reason.OOM_KILLED,
        Reason.DATA_UNUSABLE,
        Reason.DATA_NOT_FOUND,
        Reason.MODEL_NOT_FOUND,
        Reason.INVALID_CONFIG,
        Reason.TRAINING_FAILED,
        Reason.EVALUATION_FAILED,
        Reason.UPLOAD_FAILED,
        Reason.DEADLINE_EXCEEDED,
        Reason.BACKOFF_LIMIT_EXCEEDED,
        Reason.POD_FAILED,
        Reason.RESULT_MISSING,
        Reason.TRAINER_OUTPUT_INVALID,
        Reason.QUOTA_EXCEEDED,
        Reason.ADMISSION_DENIED,
        Reason.CHILD_INVALID,
        Reason.CHILD_FORBIDDEN,
        Reason.CHILD_NAME_TAKEN,
    }
)
# Reasons that warrant a Warning event when they appear: every failure, and the problems a
# user must act on while the run waits.
WARNING_REASONS = FAILURE_REASONS | {
    Reason.REFERENCE_NOT_FOUND,
    Reason.SPEC_CHANGE_DEFERRED,
    Reason.SUSPEND_NOT_SUPPORTED_WITH_QUEUE,
    Reason.UNSCHEDULABLE,
    Reason.IMAGE_PULL_FAILED,
    Reason.CONTAINER_CONFIG_ERROR,
    Reason.JOB_REJECTED,
}


class FineTuneJobStatus(StatusModel):
    phase: Phase | None = Field(
        default=None, description="Summary for display; use conditions in automation."
    )
    observed_generation: int | None = Field(
        default=None, description="Generation the status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=32, description="Current conditions."
    )
    trainer_job: str | None = Field(
        default=None, max_length=63, description="Name of the trainer Job."
    )
    progress: Progress | None = Field(
        default=None, description="Training progress reported by the trainer."
    )
    estimate: Estimate | None = Field(
        default=None, description="GPU memory prediction and the choices made from it."
    )
    data: DataReport | None = Field(default=None, description="Data cleaning report.")
    metrics: dict[str, float] | None = Field(
        default=None, description="Evaluation metrics of the adapter."
    )
    base_metrics: dict[str, float] | None = Field(
        default=None, description="Evaluation metrics of the base model."
    )
    compared_metrics: dict[str, float] | None = Field(
        default=None,
        description="Evaluation metrics of spec.evaluation.compareWith on the same eval rows.",
    )
    compared_error: str | None = Field(
        default=None,
        max_length=1024,
        description="Why spec.evaluation.compareWith was not evaluated (the run is judged on "
        "its own gates all the same).",
    )
    compared_timing_comparable: bool | None = Field(
        default=None,
        description="true when the timing metrics of comparedMetrics (latency, tokens/s) were "
        "measured as those of metrics: in the same trainer process, on the same device and "
        "timed rows, each adapter after its own untimed warm-up.",
    )
    gates: list[GateResult] | None = Field(
        default=None, description="Verdict of each quality gate."
    )
    gates_summary: str | None = Field(default=None, max_length=64, description="e.g. '3/4 passed'.")
    adapter: AdapterRecord | None = Field(default=None, description="The adapter produced.")
    cost: Cost | None = Field(default=None, description="GPU time and its price.")
    restarts: int | None = Field(
        default=None, description="Trainer pod restarts (evictions included)."
    )
    started_at: str | None = Field(
        default=None, max_length=64, description="When training first started."
    )
    completed_at: str | None = Field(
        default=None, max_length=64, description="When the job finished."
    )


def parse_status(raw: Mapping[str, Any] | None) -> FineTuneJobStatus:
    """The stored status as the model, whatever version of the operator wrote it.

    Keys this version does not know are ignored and missing ones stay unset. A field (or a
    condition) this version cannot read is left out rather than failing the whole status:
    the run it describes goes on being tracked from the rest.
    """
    data = dict(raw or {})
    try:
        return FineTuneJobStatus.model_validate(data)
    except ValidationError:
        pass
    readable: dict[str, Any] = {}
    for key, value in data.items():
        if key == "conditions" and isinstance(value, list):
            value = [c for c in value if _readable(Condition, c)]
        if _readable(FineTuneJobStatus, {key: value}):
            readable[key] = value
    return FineTuneJobStatus.model_validate(readable)


def _readable(model: type[StatusModel], value: Any) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return False
    return True


def status_wire(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as the API stores it: camelCase, with what was never set or is None left
    out (a status read and written back unchanged is the same dict)."""
    return status.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


class FineTuneJob(ApiModel):
    """A fine-tuning run: train a LoRA/QLoRA adapter, evaluate it and gate its release."""

    model_config = {"extra": "ignore"}

    api_version: Literal["finetune.dev/v1alpha1"] = Field(
        default="finetune.dev/v1alpha1", alias="apiVersion"
    )
    kind: Literal["FineTuneJob"] = Field(default="FineTuneJob")
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


# Fields that may still change once training has started (everything else is frozen).
MUTABLE_AFTER_START = (
    "suspend",
    "activeDeadlineSeconds",
    "ttlSecondsAfterFinished",
    "backoffLimit",
)


def frozen_changes(old: FineTuneJobSpec, new: FineTuneJobSpec) -> list[str]:
    """Spec fields (camelCase) that changed but may not once training has started."""
    before, after = old.to_wire(), new.to_wire()
    return sorted(
        name
        for name in set(before) | set(after)
        if name not in MUTABLE_AFTER_START and before.get(name) != after.get(name)
    )


def validate_update(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Mirror of the CRD's transition rule: raise ValueError for a forbidden spec change."""
    started = bool((old.get("status") or {}).get("startedAt"))
    if not started:
        return
    changed = frozen_changes(
        FineTuneJobSpec.model_validate(old["spec"]), FineTuneJobSpec.model_validate(new["spec"])
    )
    if changed:
        raise ValueError(
            f"spec is frozen once training has started (changed: {', '.join(changed)}); only "
            f"{', '.join(MUTABLE_AFTER_START)} may change. Create a new FineTuneJob instead."
        )
