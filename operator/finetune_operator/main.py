"""Entry module for kopf: importing it registers every handler of the operator."""

from __future__ import annotations

from .handlers import (
    adapterdeployment,  # noqa: F401  (registers the AdapterDeployment handlers)
    finetunejob,  # noqa: F401  (registers the FineTuneJob handlers)
)
from .handlers import finetuneschedule as _schedules  # noqa: F401  (FineTuneSchedule handlers)
