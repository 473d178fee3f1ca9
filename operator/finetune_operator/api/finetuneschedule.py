"""FineTuneSchedule (finetune.dev/v1alpha1): FineTuneJobs on a cron schedule, with a champion.

A FineTuneSchedule is to FineTuneJobs what a CronJob is to Jobs. Each run is a FineTuneJob made
from ``jobTemplate``; the run that the promotion policy accepts becomes ``status.champion``,
which AdapterDeployments can follow.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..domain import cron
from .common import SHORT_STRING, ApiModel, Condition, StatusModel, cel
from .finetunejob import URI_MAX, FineTuneJobSpec
from .metrics_catalog import MetricName

KIND = "FineTuneSchedule"
PLURAL = "finetuneschedules"
SHORT_NAME = "ftsched"

# Five whitespace-separated fields of cron characters, or a macro; the operator parses it fully.
SCHEDULE_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)"
    r"|[0-9A-Za-z*/,-]+([ \t]+[0-9A-Za-z*/,-]+){4})$"
)
TIME_ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"
# Runs a schedule keeps in status.runs (finished ones beyond it are dropped, oldest first).
RUN_RECORDS_MAX = 20

ConcurrencyPolicy = Literal["Forbid", "Replace"]
PromotionPolicy = Literal["GatesPassed", "BeatChampion"]
RunTrigger = Literal["Schedule", "DataChange"]
RunOutcome = Literal["Running", "Succeeded", "Failed"]
PromotionDecision = Literal["Promoted", "Kept", "NotEligible"]

LabelMap = dict[str, Annotated[str, Field(max_length=SHORT_STRING)]]


class JobTemplateMetadata(ApiModel):
    """Labels and annotations copied onto every FineTuneJob of the schedule."""

    labels: LabelMap = Field(
        default_factory=dict, max_length=64, description="Labels of each FineTuneJob."
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64, description="Annotations of each FineTuneJob."
    )


class JobTemplate(ApiModel):
    """The FineTuneJob each run creates. Each run writes its adapter to a folder of its own:
    ``spec.output.uri`` + ``/<run name>``."""

    metadata: JobTemplateMetadata = Field(
        default_factory=JobTemplateMetadata, description="Labels and annotations of each run."
    )
    spec: FineTuneJobSpec = Field(description="The FineTuneJob spec of each run.")


class DataChangeTrigger(ApiModel):
    """Run when the training data changed since the last run. A small probe Job in the
    namespace fingerprints the data sources from their metadata (file sizes and modification
    times, S3 ETags) at every check; the operator itself never reads the data."""

    check_interval_seconds: int = Field(
        default=900,
        ge=60,
        le=7 * 24 * 3600,
        description="How often the data is checked for a change (seconds).",
    )
    min_interval_seconds: int = Field(
        default=3600,
        ge=60,
        le=90 * 24 * 3600,
        description="Start a data-triggered run at most this often (seconds since the last run "
        "started).",
    )


class TriggerSpec(ApiModel):
    """What starts a run."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.onSchedule || has(self.onDataChange)",
                "trigger: set onSchedule: true or onDataChange (or both)",
                ".onSchedule",
            ),
        )
    )

    on_schedule: bool = Field(default=True, description="Run at every scheduled time.")
    on_data_change: DataChangeTrigger | None = Field(
        default=None,
        description="Also (or, with onSchedule false, only) run when the training data "
        "changed since the last run.",
    )

    @model_validator(mode="after")
    def _check(self) -> TriggerSpec:
        if not self.on_schedule and self.on_data_change is None:
            raise ValueError("trigger: set onSchedule: true or onDataChange (or both)")
        return self


class ChampionMetric(ApiModel):
    """A metric the challenger must beat the champion on."""

    metric: MetricName = Field(description="Metric name, e.g. rougeL or evalLoss.")
    min_margin: float = Field(
        default=0.0,
        ge=0.0,
        le=1e9,
        description="How much better (in the metric's better direction) the challenger must be.",
    )


class PromotionSpec(ApiModel):
    """Which finished run becomes the champion."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.policy != 'BeatChampion' || (has(self.metrics) && size(self.metrics) > 0)",
                "promotion.metrics: list at least one metric with policy BeatChampion",
                ".metrics",
            ),
        )
    )

    policy: PromotionPolicy = Field(
        default="GatesPassed",
        description="GatesPassed: every run whose quality gates passed becomes the champion. "
        "BeatChampion: it must also beat the current champion on every listed metric by its "
        "margin.",
    )
    metrics: list[ChampionMetric] = Field(
        default_factory=list, max_length=8, description="Metrics compared with BeatChampion."
    )

    @model_validator(mode="after")
    def _check(self) -> PromotionSpec:
        if self.policy == "BeatChampion" and not self.metrics:
            raise ValueError("promotion.metrics: list at least one metric with policy BeatChampion")
        return self


class FineTuneScheduleSpec(ApiModel):
    """When to run, what to run, and which result to promote."""

    schedule: str = Field(
        min_length=1,
        max_length=128,
        pattern=SCHEDULE_PATTERN,
        description="Cron schedule (minute hour day-of-month month day-of-week), e.g. "
        "'0 2 * * MON', or @daily, @weekly...",
    )
    time_zone: str | None = Field(
        default=None,
        max_length=64,
        pattern=TIME_ZONE_PATTERN,
        description="IANA time zone of the schedule, e.g. Europe/Berlin (default UTC).",
    )
    suspend: bool = Field(default=False, description="Start no new runs; running ones go on.")
    starting_deadline_seconds: int | None = Field(
        default=None,
        ge=0,
        le=30 * 24 * 3600,
        description="A scheduled time missed (operator down, a run still active) by more than "
        "this is skipped. Unset: a missed time still runs, once, whatever its delay.",
    )
    concurrency_policy: ConcurrencyPolicy = Field(
        default="Forbid",
        description="Forbid: a due run waits while one is active. Replace: the active run is "
        "deleted and the new one started.",
    )
    successful_runs_history_limit: int = Field(
        default=3, ge=0, le=100, description="Succeeded FineTuneJobs kept (the champion's always)."
    )
    failed_runs_history_limit: int = Field(
        default=1, ge=0, le=100, description="Failed FineTuneJobs kept."
    )
    trigger: TriggerSpec = Field(default_factory=TriggerSpec, description="What starts a run.")
    promotion: PromotionSpec = Field(
        default_factory=PromotionSpec, description="Which finished run becomes the champion."
    )
    job_template: JobTemplate = Field(description="The FineTuneJob of each run.")

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            cron.parse(value)
        except cron.CronError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> FineTuneScheduleSpec:
        try:
            cron.validate(self.schedule, self.time_zone)
        except cron.CronError as exc:
            raise ValueError(str(exc)) from None
        return self


# ---------------------------------------------------------------- status


class AdapterRef(StatusModel):
    uri: str = Field(max_length=URI_MAX, description="Where the adapter lives.")
    digest: str = Field(max_length=128, description="sha256 of the adapter's manifest.")
    base_model: str | None = Field(
        default=None, max_length=URI_MAX, description="Base model it was trained on."
    )
    rank: int | None = Field(default=None, description="LoRA rank.")


class MetricComparison(StatusModel):
    metric: str = Field(max_length=64, description="Metric compared.")
    challenger: float | None = Field(default=None, description="The new run's value.")
    champion: float | None = Field(default=None, description="The champion's value.")
    min_margin: float = Field(default=0.0, description="Margin the challenger had to beat by.")
    improvement: float | None = Field(
        default=None, description="Challenger minus champion, in the better direction."
    )
    passed: bool = Field(description="Whether the challenger beat the champion by the margin.")
    timing_comparable: bool | None = Field(
        default=None,
        description="Timing metrics only: whether both values were measured in the challenger's "
        "run under the same conditions. false: the metric does not decide and the champion "
        "stays (reason TimingNotComparable).",
    )


class ChampionComparison(StatusModel):
    policy: str = Field(max_length=32, description="Promotion policy applied.")
    decision: PromotionDecision = Field(
        description="Promoted, Kept (champion stays) or NotEligible (the run failed)."
    )
    reason: str = Field(default="", max_length=64, description="Why, in one word.")
    message: str = Field(default="", max_length=1024, description="Why, in words.")
    champion_job: str | None = Field(
        default=None, max_length=253, description="The champion compared with."
    )
    same_data: bool | None = Field(
        default=None,
        description="Whether challenger and champion were trained on data of the same digest.",
    )
    same_eval_rows: bool | None = Field(
        default=None,
        description="true: the champion's values were measured in the challenger's run, on the "
        "same eval rows (evaluation.compareWith). false: they are the champion's own run's "
        "recorded metrics; fallbackReason says why.",
    )
    fallback_reason: str | None = Field(
        default=None,
        max_length=1024,
        description="Why the champion's recorded metrics were compared instead of values "
        "measured on the same eval rows.",
    )
    metrics: list[MetricComparison] = Field(
        default_factory=list, max_length=8, description="Each metric compared."
    )


class GateSummary(StatusModel):
    metric: str = Field(max_length=64, description="Metric the gate checks.")
    value: float | None = Field(default=None, description="Measured value.")
    passed: bool = Field(description="Whether the gate passed.")


class ComparedRecord(StatusModel):
    digest: str = Field(max_length=128, description="Digest of the adapter compared with.")
    metrics: dict[str, float] | None = Field(
        default=None, description="Its metrics, measured on this run's eval rows."
    )
    error: str | None = Field(
        default=None, max_length=1024, description="Why it was not evaluated."
    )
    timing_comparable: bool | None = Field(
        default=None,
        description="Whether the run's trainer timed it under the same conditions as the "
        "run's own adapter (the run's status.comparedTimingComparable).",
    )


class RunRecord(StatusModel):
    name: str = Field(max_length=253, description="The FineTuneJob of the run.")
    scheduled_time: str = Field(max_length=64, description="The run's slot (RFC 3339).")
    trigger: RunTrigger = Field(description="Schedule or DataChange.")
    outcome: RunOutcome = Field(description="Running, Succeeded or Failed.")
    reason: str | None = Field(default=None, max_length=128, description="Why it failed.")
    data_digest: str | None = Field(
        default=None, max_length=128, description="Digest of the cleaned data it trained on."
    )
    source_digest: str | None = Field(
        default=None,
        max_length=128,
        description="Fingerprint of the data sources when it started (onDataChange).",
    )
    completed_at: str | None = Field(default=None, max_length=64, description="When it ended.")
    gates: list[GateSummary] | None = Field(default=None, description="Quality gate verdicts.")
    metrics: dict[str, float] | None = Field(default=None, description="Its evaluation metrics.")
    compared: ComparedRecord | None = Field(
        default=None,
        description="The champion's adapter as this run evaluated it on the same eval rows "
        "(promotion BeatChampion).",
    )
    adapter: AdapterRef | None = Field(default=None, description="The adapter it produced.")
    comparison: ChampionComparison | None = Field(
        default=None, description="The promotion decision about it."
    )


class RolledBack(StatusModel):
    adapter_deployment: str = Field(max_length=253, description="The AdapterDeployment.")
    reason: str = Field(max_length=64, description="RolledBack, CanaryAborted or Failed.")


class Champion(StatusModel):
    job: str = Field(max_length=253, description="The FineTuneJob that produced it.")
    adapter: AdapterRef = Field(description="The adapter to serve.")
    metrics: dict[str, float] | None = Field(default=None, description="Its evaluation metrics.")
    data_digest: str | None = Field(
        default=None, max_length=128, description="Digest of the data it was trained on."
    )
    since: str = Field(max_length=64, description="When it became the champion.")
    rolled_back: RolledBack | None = Field(
        default=None,
        description="Set once an AdapterDeployment following the schedule rolled this adapter "
        "back: it is not offered again, and the next successful run replaces it.",
    )


class DataCheck(StatusModel):
    slot: str = Field(max_length=64, description="The check this result belongs to (RFC 3339).")
    checked_at: str | None = Field(default=None, max_length=64, description="When it finished.")
    source_digest: str | None = Field(
        default=None, max_length=128, description="Fingerprint of the data sources."
    )
    error: str | None = Field(
        default=None, max_length=1024, description="Why the data could not be checked."
    )


class FineTuneScheduleStatus(StatusModel):
    observed_generation: int | None = Field(
        default=None, description="Generation the status reflects."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready, Suspended, LastRunFailed, PromotionBlocked, PromotionRolledBack.",
    )
    last_schedule_time: str | None = Field(
        default=None, max_length=64, description="Slot of the last run started."
    )
    last_successful_time: str | None = Field(
        default=None, max_length=64, description="When the last successful run completed."
    )
    next_schedule_time: str | None = Field(
        default=None, max_length=64, description="Next scheduled time."
    )
    last_outcome: str | None = Field(
        default=None, max_length=16, description="Outcome of the newest finished run."
    )
    active: list[str] = Field(
        default_factory=list, max_length=8, description="FineTuneJobs of the schedule running now."
    )
    runs: list[RunRecord] = Field(
        default_factory=list,
        max_length=RUN_RECORDS_MAX,
        description="Newest runs first: trigger, data digest, outcome, gates, promotion decision.",
    )
    champion: Champion | None = Field(
        default=None, description="The adapter AdapterDeployments following this schedule serve."
    )
    data_check: DataCheck | None = Field(
        default=None, description="The latest check of the training data (onDataChange)."
    )


class FineTuneSchedule(ApiModel):
    """FineTuneJobs on a cron schedule; the best adapter so far is the champion in status."""

    model_config = {"extra": "ignore"}

    api_version: Literal["finetune.dev/v1alpha1"] = Field(
        default="finetune.dev/v1alpha1", alias="apiVersion"
    )
    kind: Literal["FineTuneSchedule"] = Field(default="FineTuneSchedule")
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneScheduleSpec
    status: FineTuneScheduleStatus | None = None
