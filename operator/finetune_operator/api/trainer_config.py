"""The resolved configuration the operator hands to the trainer (and local mode builds).

The operator writes it as ``job.yaml`` in a ConfigMap mounted into the trainer pod. It holds
the FineTuneJob spec with every ``auto`` resolved, plus local paths. It never holds
credentials: those reach the fetch step as environment variables from Secrets.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import ApiModel
from .finetunejob import FineTuneJobSpec
from .trainer_output import PROGRESS_PREFIX

__all__ = ["PROGRESS_PREFIX", "ResolvedPaths", "TrainerConfig"]


class ResolvedPaths(ApiModel):
    """Local paths inside the trainer pod (or on the workstation in local mode)."""

    base_model: str = Field(description="Directory of the base model (config, weights, tokenizer).")
    train_data: str = Field(description="Training data file or folder.")
    eval_data: str | None = Field(
        default=None, description="Evaluation data file or folder, if separate."
    )
    output_dir: str = Field(description="Output directory: checkpoints, adapter, reports.")
    compared_adapter: str | None = Field(
        default=None, description="Folder of spec.evaluation.compareWith, when set."
    )
    compared_fetch_error: str | None = Field(
        default=None,
        description="File in which the fetch step of compareWith leaves its failure, if any.",
    )


class TrainerConfig(ApiModel):
    """Everything the trainer needs for one run."""

    job_name: str = Field(max_length=253, description="FineTuneJob name (for reports).")
    namespace: str = Field(default="default", max_length=63, description="FineTuneJob namespace.")
    generation: int = Field(
        default=1, ge=0, description="Spec generation this config was built from."
    )
    spec: FineTuneJobSpec = Field(description="The FineTuneJob spec with auto choices resolved.")
    paths: ResolvedPaths = Field(description="Local paths.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where to train.")
    progress_interval_seconds: float = Field(
        default=5.0, ge=0.0, le=3600.0, description="Least time between progress reports."
    )
    termination_log: str | None = Field(
        default="/dev/termination-log",
        description="File that receives the compact final result (Kubernetes termination message).",
    )
