"""Entry module for kopf: importing it registers every handler of the operator."""

from __future__ import annotations

import importlib
import importlib.util

from .handlers import finetunejob  # noqa: F401  (registers the FineTuneJob handlers)
from .handlers import finetuneschedule as _schedules  # noqa: F401  (FineTuneSchedule handlers)

# The AdapterDeployment controller registers itself the same way when it is installed.
if importlib.util.find_spec("finetune_operator.handlers.adapterdeployment") is not None:
    importlib.import_module("finetune_operator.handlers.adapterdeployment")
