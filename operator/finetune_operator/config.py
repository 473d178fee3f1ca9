"""Operator configuration, read from environment variables in one place.

Every setting has a default that works in a plain cluster, an environment variable that
overrides it, and a help text (``finetune-operator config --help``-style listings and the
Helm chart's values both come from ``FIELDS``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .policy import Policy, describe_policy, load_policy

ENV_PREFIX = "FINETUNE_"


def _help(text: str, env: str) -> dict[str, str]:
    return {"help": text, "env": env}


@dataclass(frozen=True)
class OperatorConfig:
    """Typed operator settings; build it with :func:`load_config`."""

    trainer_image: str = field(
        default="ghcr.io/finetune-dev/finetune-trainer:0.1.0",
        metadata=_help(
            "Trainer image used when a FineTuneJob sets no spec.image.", "FINETUNE_TRAINER_IMAGE"
        ),
    )
    image_pull_policy: str = field(
        default="IfNotPresent",
        metadata=_help("imagePullPolicy of trainer containers.", "FINETUNE_IMAGE_PULL_POLICY"),
    )
    operator_namespace: str = field(
        default="finetune-system",
        metadata=_help(
            "Namespace the operator runs in (holds the price table ConfigMap).",
            "FINETUNE_OPERATOR_NAMESPACE",
        ),
    )
    watch_namespaces: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "Comma-separated namespaces to watch; empty watches all namespaces.",
            "FINETUNE_WATCH_NAMESPACES",
        ),
    )
    price_table_configmap: str = field(
        default="finetune-gpu-prices",
        metadata=_help(
            "ConfigMap in the operator namespace mapping gpuProduct to price per GPU-hour "
            "(key 'currency' sets the currency, key 'default' the price for unknown products).",
            "FINETUNE_PRICE_TABLE_CONFIGMAP",
        ),
    )
    gpu_memory_overrides: Mapping[str, float] = field(
        default_factory=dict,
        metadata=_help(
            'JSON object of extra GPU products and their memory in GiB, e.g. {"NVIDIA-B200": 179}.',
            "FINETUNE_GPU_MEMORY_OVERRIDES",
        ),
    )
    default_gpu_memory_gib: float = field(
        default=0.0,
        metadata=_help(
            "GPU memory assumed when a job names no gpuProduct/gpuMemoryGiB (0: skip the fit "
            "check and report Fits=Unknown).",
            "FINETUNE_DEFAULT_GPU_MEMORY_GIB",
        ),
    )
    memory_headroom: float = field(
        default=0.1,
        metadata=_help(
            "Share of GPU memory kept free when deciding whether a job fits.",
            "FINETUNE_MEMORY_HEADROOM",
        ),
    )
    progress_poll_seconds: float = field(
        default=30.0,
        metadata=_help(
            "How often the log tail of a running trainer is read for progress (pod and Job "
            "states come from watches).",
            "FINETUNE_PROGRESS_POLL_SECONDS",
        ),
    )
    progress_polls_per_second: float = field(
        default=20.0,
        metadata=_help(
            "Most polls of running jobs per second, all jobs together: with more running jobs "
            "than progressPollSeconds times this, each job is polled less often.",
            "FINETUNE_PROGRESS_POLLS_PER_SECOND",
        ),
    )
    unobserved_reconcile_seconds: float = field(
        default=60.0,
        metadata=_help(
            "A FineTuneJob whose current spec no reconcile has observed after this many "
            "seconds without changes is reconciled anyway (a lost race with another "
            "operator instance over the finalizer would otherwise strand it).",
            "FINETUNE_UNOBSERVED_RECONCILE_SECONDS",
        ),
    )
    progress_interval_seconds: float = field(
        default=10.0,
        metadata=_help(
            "Least time between progress lines the trainer prints.",
            "FINETUNE_PROGRESS_INTERVAL_SECONDS",
        ),
    )
    log_tail_lines: int = field(
        default=200,
        metadata=_help(
            "Trainer log lines read per poll to find progress.", "FINETUNE_LOG_TAIL_LINES"
        ),
    )
    job_ttl_seconds: int | None = field(
        default=None,
        metadata=_help(
            "Override ttlSecondsAfterFinished of trainer Jobs (default: the FineTuneJob's).",
            "FINETUNE_JOB_TTL_SECONDS",
        ),
    )
    run_as_user: int = field(
        default=1000,
        metadata=_help("UID trainer pods run as (never root).", "FINETUNE_RUN_AS_USER"),
    )
    metrics_port: int = field(
        default=8080,
        metadata=_help(
            "Port of the Prometheus /metrics endpoint (0 disables).", "FINETUNE_METRICS_PORT"
        ),
    )
    retry_seconds: float = field(
        default=30.0,
        metadata=_help(
            "Delay before re-checking a job that waits on a missing PVC or Secret.",
            "FINETUNE_RETRY_SECONDS",
        ),
    )
    vllm_image_patterns: tuple[str, ...] = field(
        default=("vllm/vllm-openai*", "docker.io/vllm/vllm-openai*", "*/vllm/vllm-openai*"),
        metadata=_help(
            "Comma-separated fnmatch patterns of images whose own entry point runs the vLLM "
            "server: a container of such an image that sets only args is read as vllm serve "
            "(chart value operator.serving.vllmImagePatterns).",
            "FINETUNE_VLLM_IMAGE_PATTERNS",
        ),
    )
    status_write_retries: int = field(
        default=5,
        metadata=_help(
            "Attempts at a status write that meets a conflict (409/422).",
            "FINETUNE_STATUS_WRITE_RETRIES",
        ),
    )
    serving_poll_seconds: float = field(
        default=5.0,
        metadata=_help(
            "While an AdapterDeployment's rollout, canary analysis or runtime load is under "
            "way, how often it is looked at again between events (idle and failed ones are "
            "looked at only when something they depend on changes).",
            "FINETUNE_SERVING_POLL_SECONDS",
        ),
    )
    serving_http_timeout_seconds: float = field(
        default=10.0,
        metadata=_help(
            "Timeout of the operator's calls to serving pods (smoke requests: 60 s).",
            "FINETUNE_SERVING_HTTP_TIMEOUT_SECONDS",
        ),
    )
    serving_max_backoff_seconds: float = field(
        default=300.0,
        metadata=_help(
            "Longest wait before an AdapterDeployment whose reconcile failed (API errors, "
            "unreachable serving pods) is tried again; the wait doubles from "
            "servingPollSeconds with each failure in a row.",
            "FINETUNE_SERVING_MAX_BACKOFF_SECONDS",
        ),
    )
    local_mode: bool = field(
        default=False,
        metadata=_help(
            "Local/test mode only (the embedded demo): serving pods are reached at the URL in "
            "their finetune.dev/endpoint annotation and file:// adapters are read from the "
            "operator's own disk. Never set it in a cluster.",
            "FINETUNE_LOCAL_MODE",
        ),
    )
    # The platform policy has its own FINETUNE_POLICY_* variables (policy.py).
    policy: Policy = field(default_factory=Policy, metadata={"group": "policy"})


def describe() -> list[dict[str, Any]]:
    """Each setting with its environment variable, default and help text."""
    defaults = OperatorConfig()
    return [
        {
            "name": f.name,
            "env": f.metadata["env"],
            "default": getattr(defaults, f.name),
            "help": f.metadata["help"],
        }
        for f in fields(OperatorConfig)
        if "env" in f.metadata
    ] + describe_policy()


class ConfigError(ValueError):
    """An environment variable holds a value the operator cannot use."""


def _parse(name: str, raw: str, kind: object) -> Any:
    try:
        if name in ("watch_namespaces", "vllm_image_patterns"):
            return tuple(ns.strip() for ns in raw.split(",") if ns.strip())
        if name == "gpu_memory_overrides":
            value = json.loads(raw) if raw.strip() else {}
            if not isinstance(value, dict) or not all(
                isinstance(v, int | float) and v > 0 for v in value.values()
            ):
                raise ValueError("expected a JSON object of product name -> GiB (> 0)")
            return {str(k): float(v) for k, v in value.items()}
        if name == "job_ttl_seconds":
            return int(raw) if raw.strip() else None
        if kind in (bool, "bool"):
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("", "0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        return raw
    except ValueError as exc:
        env = ENV_PREFIX + name.upper()
        raise ConfigError(f"{env}={raw!r}: {exc}") from exc


def load_config(env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Build the configuration from ``env`` (default: the process environment)."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(OperatorConfig):
        var = f.metadata.get("env")
        if var is not None and var in source:
            values[f.name] = _parse(f.name, source[var], f.type)
    try:
        values["policy"] = load_policy(source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    config = OperatorConfig(**values)
    if not config.policy.image_allowed(config.trainer_image):
        raise ConfigError(
            f"FINETUNE_TRAINER_IMAGE={config.trainer_image!r} matches none of "
            "FINETUNE_POLICY_ALLOWED_IMAGES: jobs without spec.image could not run"
        )
    if not 0.0 <= config.memory_headroom < 0.9:
        raise ConfigError("FINETUNE_MEMORY_HEADROOM must be in [0, 0.9)")
    if config.progress_poll_seconds <= 0:
        raise ConfigError("FINETUNE_PROGRESS_POLL_SECONDS must be > 0")
    if config.progress_polls_per_second <= 0:
        raise ConfigError("FINETUNE_PROGRESS_POLLS_PER_SECOND must be > 0")
    for name in ("serving_poll_seconds", "serving_http_timeout_seconds"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be > 0")
    if config.serving_max_backoff_seconds < config.serving_poll_seconds:
        raise ConfigError(
            "FINETUNE_SERVING_MAX_BACKOFF_SECONDS must be >= FINETUNE_SERVING_POLL_SECONDS"
        )
    if config.unobserved_reconcile_seconds <= 0:
        raise ConfigError("FINETUNE_UNOBSERVED_RECONCILE_SECONDS must be > 0")
    return config
