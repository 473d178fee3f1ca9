"""The finetune.dev/v1alpha1 API: pydantic models are the single source of truth."""

from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from .common import API_VERSION, GROUP, VERSION, get_condition, is_condition_true, set_condition
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "get_condition",
    "is_condition_true",
    "set_condition",
]
