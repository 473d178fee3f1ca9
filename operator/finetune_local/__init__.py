"""Run the operator without a cluster: an embedded Kubernetes API server and an in-process runner.

Used by the tests, the embedded demo and the scale benchmark. Needs the `[local]` extra
(kmock); nothing else in the operator imports this package.
"""

from .emulator import Emulator, Fault, RunningServer, WriteRecord, serve
from .resources import DEFAULT_RESOURCES, ResourceType
from .runner import (
    OperatorRun,
    client_configuration,
    run_operator,
    run_operator_async,
    test_settings,
)

__all__ = [
    "DEFAULT_RESOURCES",
    "Emulator",
    "Fault",
    "OperatorRun",
    "ResourceType",
    "RunningServer",
    "WriteRecord",
    "client_configuration",
    "run_operator",
    "run_operator_async",
    "serve",
    "test_settings",
]
