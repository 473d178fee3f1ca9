"""AdapterDeployment (finetune.dev/v1alpha1): roll a gated adapter into a vLLM Deployment."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from .common import ApiModel, Condition, LocalObjectRef, SecretKeyRef, StatusModel, cel
from .finetunejob import ADAPTER_URI_PATTERN, DIGEST_PATTERN, URI_MAX, URI_RULES, check_uri

KIND = "AdapterDeployment"
PLURAL = "adapterdeployments"

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"

SOURCE_KINDS_MESSAGE = "set exactly one of fineTuneJobRef, uri or fineTuneScheduleRef"

StrategyType = Literal["Rolling", "Canary", "Runtime"]


class AdapterSource(ApiModel):
    """Which adapter to serve: a FineTuneJob's result, an explicit URI pinned by digest, or
    whatever champion a FineTuneSchedule names."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "has(self.fineTuneJobRef) ? !has(self.uri) && !has(self.fineTuneScheduleRef)"
                " : has(self.uri) != has(self.fineTuneScheduleRef)",
                SOURCE_KINDS_MESSAGE,
                ".uri",
            ),
            (
                "!has(self.uri) || has(self.digest)",
                "digest is required with uri (sha256:<64 hex>)",
                ".digest",
            ),
        )
    )

    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None, description="A FineTuneJob in this namespace whose adapter is served."
    )
    fine_tune_schedule_ref: LocalObjectRef | None = Field(
        default=None,
        description="A FineTuneSchedule in this namespace: its status.champion is served, and "
        "each new champion is rolled out with this AdapterDeployment's strategy.",
    )
    uri: str | None = Field(
        default=None,
        max_length=URI_MAX,
        pattern=ADAPTER_URI_PATTERN,
        description="Adapter location (pvc://claim/path, s3://, file:///, hf://org/name@rev).",
        json_schema_extra={"x-kubernetes-validations": URI_RULES},
    )
    digest: str | None = Field(
        default=None,
        max_length=71,
        pattern=DIGEST_PATTERN,
        description="sha256:<hex> of the adapter's manifest; required with uri.",
    )
    base_model: str | None = Field(
        default=None,
        max_length=URI_MAX,
        description="Base model the adapter was trained on (with uri).",
    )
    rank: int | None = Field(
        default=None, ge=1, le=512, description="LoRA rank of the adapter (with uri)."
    )
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret with HF_TOKEN or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for fetching "
        "an s3:// or hf:// adapter. Exposed to the fetch init container only; never copied.",
    )

    @model_validator(mode="after")
    def _check(self) -> AdapterSource:
        kinds = (self.fine_tune_job_ref, self.uri, self.fine_tune_schedule_ref)
        if sum(kind is not None for kind in kinds) != 1:
            raise ValueError(f"source: {SOURCE_KINDS_MESSAGE}")
        if self.uri is not None:
            check_uri(self.uri)
            if self.digest is None:
                raise ValueError("source.digest: required with source.uri (sha256:<64 hex>)")
        return self


class TargetSpec(ApiModel):
    """The serving Deployment to roll the adapter into."""

    deployment: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Name of a Deployment in this namespace running vLLM. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self == oldSelf",
                    "message": "target.deployment is immutable: create a new AdapterDeployment",
                }
            ]
        },
    )
    container: str | None = Field(
        default=None, max_length=63, description="Container running vLLM (default: the first one)."
    )
    service: str | None = Field(
        default=None,
        max_length=63,
        description="Service in front of the Deployment (for smoke requests).",
    )
    port: int = Field(
        default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible server."
    )
    allow_server_arg_changes: bool = Field(
        default=False,
        description="Allow raising --max-lora-rank / --max-loras on the target when the adapter needs it.",
    )


class CanaryAnalysis(ApiModel):
    """Thresholds the canary must hold during its analysis window."""

    interval_seconds: int = Field(default=30, ge=1, le=3600, description="Seconds between checks.")
    checks: int = Field(default=5, ge=1, le=1000, description="Checks in the analysis window.")
    max_error_rate: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Abort above this failure share."
    )
    max_latency_p95_ms: float = Field(
        default=2000.0, gt=0.0, le=600_000.0, description="Abort above this p95 latency."
    )
    min_requests: int = Field(
        default=0, ge=0, le=1_000_000, description="Requests needed before judging rates."
    )
    min_tokens_per_second_per_request: float | None = Field(
        default=None,
        gt=0.0,
        le=100_000.0,
        description="Abort below this generation speed one request sees while decoding: "
        "generated tokens after the first over decode time, from vLLM's "
        "vllm:request_decode_time_seconds and vllm:request_generation_tokens. Unset: not "
        "judged.",
    )
    smoke_requests: int = Field(
        default=3, ge=0, le=100, description="Chat requests sent to the canary per check."
    )
    smoke_prompt: str = Field(
        default="Say hello.", max_length=4096, description="Prompt of the smoke requests."
    )


class CanarySpec(ApiModel):
    replicas: int = Field(default=1, ge=1, le=100, description="Replicas of the canary copy.")
    analysis: CanaryAnalysis = Field(
        default_factory=CanaryAnalysis, description="Analysis thresholds."
    )


class StrategySpec(ApiModel):
    """How the adapter reaches the servers."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.canary) || self.type == 'Canary'",
                "canary settings are only allowed with type Canary",
                ".canary",
            ),
        )
    )

    type: StrategyType = Field(
        default="Rolling",
        description="Rolling (patch the Deployment), Canary (copy with the new adapter, analyse, "
        "promote) or Runtime (load through the server's LoRA API, no restart).",
    )
    canary: CanarySpec | None = Field(default=None, description="Canary settings (type Canary).")
    progress_deadline_seconds: int = Field(
        default=600,
        ge=10,
        le=86400,
        description="Give up (and roll back) when the rollout stalls this long.",
    )

    @model_validator(mode="after")
    def _check(self) -> StrategySpec:
        if self.canary is not None and self.type != "Canary":
            raise ValueError("strategy.canary: only allowed with strategy.type Canary")
        return self


class RollbackSpec(ApiModel):
    automatic: bool = Field(
        default=True, description="Restore the previous adapter when a rollout fails."
    )
    to_revision: int | None = Field(
        default=None,
        ge=1,
        description="Serve this earlier revision from status.history instead of source.",
    )


class AdapterDeploymentSpec(ApiModel):
    adapter_name: str = Field(
        min_length=1,
        max_length=128,
        pattern=ADAPTER_NAME_PATTERN,
        description="The model name clients request (the --lora-modules name). Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self == oldSelf",
                    "message": "adapterName is immutable: create a new AdapterDeployment",
                }
            ]
        },
    )
    source: AdapterSource = Field(description="Which adapter to serve.")
    target: TargetSpec = Field(description="Where to serve it.")
    strategy: StrategySpec = Field(default_factory=StrategySpec, description="How to roll it out.")
    require_gates: bool = Field(
        default=True,
        description="Refuse a FineTuneJob adapter whose quality gates did not all pass.",
    )
    rollback: RollbackSpec = Field(default_factory=RollbackSpec, description="Rollback behaviour.")


# ---------------------------------------------------------------- status


class ConditionType(StrEnum):
    """Conditions of an AdapterDeployment, in the order they appear in status."""

    SOURCE_READY = "SourceReady"
    COMPATIBLE = "Compatible"
    PROGRESSING = "Progressing"
    AVAILABLE = "Available"
    DEGRADED = "Degraded"


class Phase(StrEnum):
    """status.phase: a one-word summary for display (conditions carry the detail)."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    ANALYZING = "Analyzing"
    AVAILABLE = "Available"
    ROLLED_BACK = "RolledBack"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class Outcome(StrEnum):
    """What became of one revision (status.current/previous/history/canary.revision)."""

    PROGRESSING = "Progressing"
    CANARY = "Canary"
    PROMOTED = "Promoted"
    AVAILABLE = "Available"
    SUPERSEDED = "Superseded"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    CANARY_ABORTED = "CanaryAborted"
    FAILED = "Failed"


class Reason(StrEnum):
    """Every condition reason the AdapterDeployment controller writes (docs/troubleshooting.md)."""

    # SourceReady
    RESOLVED = "Resolved"
    ROLLBACK_TO_REVISION = "RollbackToRevision"
    REVISION_NOT_FOUND = "RevisionNotFound"
    INVALID_SPEC = "InvalidSpec"
    FINETUNEJOB_NOT_FOUND = "FineTuneJobNotFound"
    FINETUNEJOB_NOT_FINISHED = "FineTuneJobNotFinished"
    FINETUNEJOB_FAILED = "FineTuneJobFailed"
    FINETUNESCHEDULE_NOT_FOUND = "FineTuneScheduleNotFound"
    NO_CHAMPION = "NoChampion"
    CHAMPION_ROLLED_BACK = "ChampionRolledBack"
    CHAMPION_INVALID = "ChampionInvalid"
    GATES_FAILED = "GatesFailed"
    ADAPTER_MISSING = "AdapterMissing"
    ADAPTER_NOT_FOUND = "AdapterNotFound"
    DIGEST_MISMATCH = "DigestMismatch"
    LOCAL_ADAPTER_REFUSED = "LocalAdapterRefused"
    # Compatible
    COMPATIBLE = "Compatible"
    TARGET_NOT_FOUND = "TargetNotFound"
    CONTAINER_NOT_FOUND = "ContainerNotFound"
    SERVER_ARGS_INVALID = "ServerArgsInvalid"
    SERVER_NOT_DETECTED = "ServerNotDetected"
    SERVER_CONFIG_UNREADABLE = "ServerConfigUnreadable"
    TARGET_PORT_MISMATCH = "TargetPortMismatch"
    ADAPTER_NAME_TAKEN = "AdapterNameTaken"
    RUNTIME_UPDATES_DISABLED = "RuntimeUpdatesDisabled"
    LORA_NOT_ENABLED = "LoraNotEnabled"
    BASE_MODEL_MISMATCH = "BaseModelMismatch"
    RANK_TOO_LARGE = "RankTooLarge"
    TOO_MANY_ADAPTERS = "TooManyAdapters"
    ADAPTER_NOT_MOUNTED = "AdapterNotMounted"
    # Progressing / Available / Degraded
    ROLLOUT_STARTED = "RolloutStarted"
    TEMPLATE_NOT_UPDATED = "TemplateNotUpdated"
    ROLLING_OUT = "RollingOut"
    LOADING = "Loading"
    ROLLOUT_COMPLETE = "RolloutComplete"
    ROLLOUT_DEADLINE_EXCEEDED = "RolloutDeadlineExceeded"
    PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    LOAD_FAILED = "LoadFailed"
    UNAUTHORIZED = "Unauthorized"
    RELOAD_FAILED = "ReloadFailed"
    CANARY_STARTED = "CanaryStarted"
    CANARY_STARTING = "CanaryStarting"
    CANARY_UNAVAILABLE = "CanaryUnavailable"
    ANALYZING = "Analyzing"
    WAITING_FOR_TRAFFIC = "WaitingForTraffic"
    CANARY_PASSED = "CanaryPassed"
    CANARY_PROMOTED = "CanaryPromoted"
    CANARY_SMOKE_FAILED = "CanarySmokeFailed"
    CANARY_ERROR_RATE = "CanaryErrorRate"
    CANARY_LATENCY = "CanaryLatency"
    CANARY_SLOW_GENERATION = "CanarySlowGeneration"
    SUPERSEDED = "Superseded"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    ROLLBACK_FAILED = "RollbackFailed"
    PREVIOUS_REVISION_RESTORED = "PreviousRevisionRestored"
    NO_ADAPTER_SERVED = "NoAdapterServed"
    ADAPTER_REMOVED_FROM_TARGET = "AdapterRemovedFromTarget"
    NO_REPLICAS_AVAILABLE = "NoReplicasAvailable"
    AS_EXPECTED = "AsExpected"


class AdapterRevision(StatusModel):
    revision: int = Field(description="Monotonic revision number.")
    uri: str = Field(max_length=URI_MAX, description="Adapter location.")
    digest: str = Field(max_length=128, description="Adapter digest.")
    base_model: str | None = Field(default=None, max_length=URI_MAX, description="Base model.")
    rank: int | None = Field(default=None, description="LoRA rank.")
    deployed_at: str | None = Field(
        default=None, max_length=64, description="When it became current."
    )
    outcome: Outcome | None = Field(
        default=None,
        description="Progressing, Canary, Promoted, Available, Superseded, RollingBack, "
        "RolledBack, CanaryAborted or Failed.",
    )


class PodAdapter(StatusModel):
    pod: str = Field(max_length=253, description="Pod name.")
    digest: str | None = Field(default=None, max_length=128, description="Digest it serves.")


class CanaryStatus(StatusModel):
    revision: AdapterRevision | None = Field(
        default=None, description="The candidate revision the canary serves."
    )
    deployment: str | None = Field(default=None, max_length=253, description="Canary Deployment.")
    checks_passed: int | None = Field(default=None, description="Analysis checks passed so far.")
    error_rate: float | None = Field(default=None, description="Observed failure share.")
    latency_p95_ms: float | None = Field(default=None, description="Observed p95 latency.")
    tokens_per_second_per_request: float | None = Field(
        default=None, description="Observed generation tokens/s per request while decoding."
    )
    requests: int | None = Field(default=None, description="Requests observed.")
    started_at: str | None = Field(default=None, max_length=64, description="When analysis began.")
    unavailable_since: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "When the canary lost its ready pods during analysis; analysis pauses, and the "
            "canary is aborted unless it recovers within progressDeadlineSeconds."
        ),
    )


# Kept for readers of the old name: the phases as a type.
AdapterDeploymentPhase = Phase


class AdapterDeploymentStatus(StatusModel):
    phase: Phase | None = Field(default=None, description="Summary for display.")
    observed_generation: int | None = Field(
        default=None, description="Generation the status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=32, description="Current conditions."
    )
    current: AdapterRevision | None = Field(default=None, description="Adapter being served.")
    previous: AdapterRevision | None = Field(default=None, description="Adapter served before.")
    history: list[AdapterRevision] | None = Field(
        default=None, max_length=20, description="Recent revisions."
    )
    ready_replicas: int | None = Field(
        default=None, description="Ready replicas serving the current adapter."
    )
    pods: list[PodAdapter] | None = Field(
        default=None, description="Per pod: which digest it serves."
    )
    canary: CanaryStatus | None = Field(default=None, description="Canary analysis state.")
    rollout_started_at: str | None = Field(
        default=None, max_length=64, description="When the rollout of the current revision began."
    )


class AdapterDeployment(ApiModel):
    """Serve a trained adapter from a vLLM Deployment, with analysis and rollback."""

    model_config = {"extra": "ignore"}

    api_version: Literal["finetune.dev/v1alpha1"] = Field(
        default="finetune.dev/v1alpha1", alias="apiVersion"
    )
    kind: Literal["AdapterDeployment"] = Field(default="AdapterDeployment")
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None


def validate_update(old: dict[str, object], new: dict[str, object]) -> None:
    """Mirror of the CRD's transition rules: adapterName and target.deployment are immutable."""
    before = AdapterDeploymentSpec.model_validate(old["spec"])
    after = AdapterDeploymentSpec.model_validate(new["spec"])
    if before.adapter_name != after.adapter_name:
        raise ValueError("adapterName is immutable: create a new AdapterDeployment")
    if before.target.deployment != after.target.deployment:
        raise ValueError("target.deployment is immutable: create a new AdapterDeployment")
