"""Play the cluster around the real operator: the Job controller, the kubelet, the trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import kopf
from finetune_local import Emulator, OperatorRun
from finetune_operator.clients.kube import KubeClient
from finetune_operator.config import OperatorConfig

from support.k8s_fixtures import wait_for

NS = "default"
FAST = OperatorConfig(
    progress_poll_seconds=0.2,
    metrics_port=0,
    operator_namespace="finetune-system",
    status_write_retries=5,
    retry_seconds=0.5,
    unobserved_reconcile_seconds=3.0,
    # AdapterDeployments: "pods" are local servers reached through their endpoint
    # annotation, adapters are local folders, in-flight rollouts are looked at often.
    serving_poll_seconds=0.1,
    serving_http_timeout_seconds=5.0,
    local_mode=True,
)


def start_operator(
    emulator: Emulator, operator_runner: Any, config: OperatorConfig = FAST
) -> OperatorRun:
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(config=config, kube=KubeClient.from_url(str(emulator.url)))
    return operator_runner(memo=memo, namespaces=[NS])  # type: ignore[no-any-return]


@contextlib.contextmanager
def operator(emulator: Emulator, config: OperatorConfig = FAST) -> Iterator[OperatorRun]:
    """An operator run that can be stopped mid-test (restart scenarios)."""
    import finetune_operator.main  # noqa: F401
    from finetune_local import run_operator

    memo = kopf.Memo(config=config, kube=KubeClient.from_url(str(emulator.url)))
    with run_operator(emulator, memo=memo, namespaces=[NS]) as run:
        yield run


def ftj_body(
    name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": meta,
        "spec": spec,
    }


def add_prerequisites(
    emulator: Emulator,
    pvcs: tuple[str, ...] = ("datasets", "adapters"),
    secrets: tuple[str, ...] = ("hf-token",),
) -> None:
    for claim in pvcs:
        emulator.create(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": NS},
                "spec": {},
            }
        )
    for secret in secrets:
        emulator.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": secret, "namespace": NS},
                "data": {"HF_TOKEN": "aGZfc2VjcmV0X3ZhbHVl"},
            }
        )


def ftj(emulator: Emulator, name: str) -> dict[str, Any]:
    obj = emulator.read("finetunejobs", NS, name)
    assert obj is not None
    return obj


def status(emulator: Emulator, name: str) -> dict[str, Any]:
    return dict(ftj(emulator, name).get("status") or {})


def condition(emulator: Emulator, name: str, type_: str) -> dict[str, Any] | None:
    for cond in status(emulator, name).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def wait_condition(
    emulator: Emulator,
    name: str,
    type_: str,
    value: str,
    reason: str | None = None,
    timeout: float = 15,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        cond = condition(emulator, name, type_)
        if (
            cond
            and cond.get("status") == value
            and (reason is None or cond.get("reason") == reason)
        ):
            return cond
        return None

    return wait_for(
        check,
        timeout=timeout,
        what=lambda: f"{type_}={value} ({reason}) on {name}; status={status(emulator, name)}",
    )


def wait_phase(emulator: Emulator, name: str, phase: str, timeout: float = 15) -> dict[str, Any]:
    return wait_for(
        lambda: status(emulator, name) if status(emulator, name).get("phase") == phase else None,
        timeout=timeout,
        what=f"phase {phase} of {name}",
    )


def trainer_jobs(emulator: Emulator) -> list[dict[str, Any]]:
    return emulator.read_all("jobs", NS)


def wait_job(emulator: Emulator, name: str, timeout: float = 15) -> dict[str, Any]:
    return wait_for(lambda: emulator.read("jobs", NS, name), timeout=timeout, what=f"Job {name}")


def start_pod(
    emulator: Emulator,
    job: dict[str, Any],
    suffix: str = "a",
    *,
    running: bool = True,
    created: str | None = None,
) -> str:
    """Create the Job's pod as the Job controller would, then run it as the kubelet would."""
    template = job["spec"]["template"]
    name = f"{job['metadata']['name']}-{suffix}"
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NS,
        "labels": {**template["metadata"]["labels"], "job-name": job["metadata"]["name"]},
        "ownerReferences": [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job["metadata"]["name"],
                "uid": job["metadata"]["uid"],
                "controller": True,
            }
        ],
    }
    emulator.create(
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]},
        keep_status=False,
    )
    if running:
        emulator.patch_status(
            "pods",
            NS,
            name,
            {
                "phase": "Running",
                "startTime": created or "2026-01-01T00:00:00Z",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": created or "2026-01-01T00:00:00Z"}},
                    }
                ],
            },
        )
    return name


def events(emulator: Emulator, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in emulator.read_all("events", NS)
        if (e.get("involvedObject") or {}).get("name") == name
    ]
