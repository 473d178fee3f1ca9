"""Where the AdapterDeployment controller reaches a serving pod.

In a cluster it is ``http://<podIP>:<target.port>``. Tests and the embedded demo run every
"pod" as a local server on its own port; in local mode (``FINETUNE_LOCAL_MODE``, see
:mod:`finetune_operator.config`) the operator uses the URL in the pod annotation
``finetune.dev/endpoint`` instead. Never in a cluster, where anyone able to annotate pods
could point the operator at another server.
"""

from __future__ import annotations

from typing import Any

ENDPOINT_ANNOTATION = "finetune.dev/endpoint"


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
