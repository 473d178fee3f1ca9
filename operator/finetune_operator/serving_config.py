"""Settings of the AdapterDeployment controller (environment variables, one place).

``endpoint_resolver`` decides where the operator reaches a serving pod. In a cluster it
is ``http://<podIP>:<target.port>``. Tests and the embedded demo run every "pod" as a
local server on its own port; they either assign a resolver in code
(``SETTINGS.endpoint_resolver = ...``) or set ``FINETUNE_POD_ENDPOINT_OVERRIDE=annotation``,
which makes the operator use the URL in the pod annotation ``finetune.dev/endpoint``.
That override is a local/test hook: never set it in a cluster, where anyone able to
annotate pods could point the operator at another server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ENDPOINT_ANNOTATION = "finetune.dev/endpoint"

EndpointResolver = Callable[[dict[str, Any], int], "str | None"]


def pod_ip_endpoint(pod: dict[str, Any], port: int) -> str | None:
    """``http://<podIP>:<port>``, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"http://{host}:{port}"


def annotation_endpoint(pod: dict[str, Any], port: int) -> str | None:
    """Local/test hook: the URL in the pod's ``finetune.dev/endpoint`` annotation."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    url = annotations.get(ENDPOINT_ANNOTATION)
    return str(url) if url else pod_ip_endpoint(pod, port)


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from exc


@dataclass
class ServingSettings:
    poll_seconds: float = 5.0
    fetch_image: str = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
    http_timeout_seconds: float = 10.0
    endpoint_resolver: EndpointResolver = field(default=pod_ip_endpoint)

    @classmethod
    def from_env(cls) -> ServingSettings:
        override = os.environ.get("FINETUNE_POD_ENDPOINT_OVERRIDE", "")
        if override not in ("", "annotation"):
            raise ValueError(
                f"FINETUNE_POD_ENDPOINT_OVERRIDE={override!r}: only 'annotation' is supported"
            )
        return cls(
            poll_seconds=_float_env("FINETUNE_SERVING_POLL_SECONDS", 5.0),
            fetch_image=os.environ.get("FINETUNE_TRAINER_IMAGE", cls.fetch_image),
            http_timeout_seconds=_float_env("FINETUNE_SERVING_HTTP_TIMEOUT_SECONDS", 10.0),
            endpoint_resolver=annotation_endpoint if override else pod_ip_endpoint,
        )


SETTINGS = ServingSettings.from_env()
