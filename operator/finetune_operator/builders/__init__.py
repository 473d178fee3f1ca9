"""Pure builders: a FineTuneJob spec in, Kubernetes object dicts out (no I/O)."""

from ..api.common import owner_reference
from .names import LABEL_GENERATION, LABEL_JOB, LABEL_MANAGED_BY, LABEL_NAME, child_name
from .trainer import (
    CONFIG_KEY,
    TRAINER_CONTAINER,
    pod_paths,
    resolve_trainer_config,
    trainer_configmap,
    trainer_job,
)

__all__ = [
    "CONFIG_KEY",
    "LABEL_GENERATION",
    "LABEL_JOB",
    "LABEL_MANAGED_BY",
    "LABEL_NAME",
    "TRAINER_CONTAINER",
    "child_name",
    "owner_reference",
    "pod_paths",
    "resolve_trainer_config",
    "trainer_configmap",
    "trainer_job",
]
