"""Failures the trainer reports to the operator: a reason word, a message and an exit code."""

from __future__ import annotations

# Exit codes of the CLI (the contract with the operator and with people running it by hand).
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_TRAINING = 4
EXIT_EVALUATION = 5
EXIT_UPLOAD = 6  # the s3:// upload failed in a way a later attempt may get past


class TrainerError(Exception):
    """A failure with a CamelCase reason and a message saying what to change."""

    def __init__(self, reason: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exit_code = exit_code


def invalid_config(message: str) -> TrainerError:
    return TrainerError("InvalidConfig", message, EXIT_CONFIG)


def data_unusable(message: str) -> TrainerError:
    return TrainerError("DataUnusable", message, EXIT_DATA)


def data_not_found(message: str) -> TrainerError:
    return TrainerError("DataNotFound", message, EXIT_DATA)


def model_not_found(message: str) -> TrainerError:
    return TrainerError("ModelNotFound", message, EXIT_TRAINING)


def training_failed(message: str) -> TrainerError:
    return TrainerError("TrainingFailed", message, EXIT_TRAINING)


def out_of_memory(message: str) -> TrainerError:
    return TrainerError("OutOfMemory", message, EXIT_TRAINING)


def evaluation_failed(message: str) -> TrainerError:
    return TrainerError("EvaluationFailed", message, EXIT_EVALUATION)
