"""The trainer's ConfigMap and batch/v1 Job, built from a FineTuneJob spec (pure).

Inputs on ``pvc://`` are mounted from the claim; ``hf://`` and ``s3://`` inputs are fetched
into an emptyDir by one init container per source, each with only its own Secret in its
environment. Secret values never enter the ConfigMap: the trainer sees local paths only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..api.finetunejob import FineTuneJobSpec
from ..api.trainer_config import ResolvedPaths, TrainerConfig
from ..config import OperatorConfig
from ..domain.uris import StorageUri
from ..policy import init_resources, trainer_resources
from .names import (
    ANNOTATION_SPEC_HASH,
    child_labels,
    trainer_configmap_name,
    trainer_job_name,
)

TRAINER_CONTAINER = "trainer"
CONFIG_KEY = "job.yaml"
# libyaml's emitter when PyYAML has it: the pure-Python one was a tenth of the operator's CPU
# when a thousand jobs started at once.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
CONFIG_DIR = "/etc/finetune"
INPUTS_DIR = "/work/inputs"
OUTPUT_DIR = "/work/output"
PVC_ROOT = "/mnt/pvc"
TERMINATION_LOG = "/dev/termination-log"
# evaluation.compareWith: its fetch folder, and the file its fetch step writes a failure to.
COMPARE_FETCH = "compare"
COMPARE_FETCH_ERROR = f"{INPUTS_DIR}/compare-fetch-error.txt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
# Exit codes of finetune-trainer that a retry cannot fix (bad config, unusable data).
NON_RETRYABLE_EXIT_CODES = (2, 3)


# ---------------------------------------------------------------- paths and volumes


@dataclass
class PodLayout:
    """Where each input lives inside the pod and what provides it."""

    paths: ResolvedPaths
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    fetches: list[tuple[str, str, str | None]] = field(default_factory=list)  # name, uri, secret
    # evaluation.compareWith fetched from hf:// or s3://: (uri, digest, secret). Optional:
    # its failure is written to a file and the run goes on without it.
    compare_fetch: tuple[str, str, str | None] | None = None


def _volume_name(claim: str) -> str:
    # Volume names are DNS labels (at most 63 characters): a longer claim name is cut and given
    # a stable hash, so two long claims sharing a prefix still get distinct volumes.
    name = f"pvc-{claim}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(claim.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def pod_paths(spec: FineTuneJobSpec) -> PodLayout:
    """Map every URI of the spec to a local path, with the volumes and fetches it needs."""
    claims: dict[str, bool] = {}  # claim -> needs write access

    def local(uri: str, fetch_as: str, secret: str | None, *, write: bool = False) -> str:
        parsed = StorageUri.parse(uri)
        if parsed.scheme == "pvc":
            claims[parsed.claim] = claims.get(parsed.claim, False) or write
            return parsed.under(PVC_ROOT)
        if parsed.scheme == "file":
            return parsed.path
        if write:
            return OUTPUT_DIR  # s3:// output: written locally, uploaded by the trainer
        layout.fetches.append((fetch_as, uri, secret))
        return parsed.fetched_path(f"{INPUTS_DIR}/{fetch_as}")

    layout = PodLayout(paths=ResolvedPaths(base_model="", train_data="", output_dir=""))
    ref = spec.base_model.credentials_secret_ref
    base = local(spec.base_model.uri, "model", ref.name if ref else None)
    train_ref = spec.dataset.train.credentials_secret_ref
    train = local(spec.dataset.train.uri, "train", train_ref.name if train_ref else None)
    eval_path = None
    if spec.dataset.eval is not None:
        eval_ref = spec.dataset.eval.credentials_secret_ref
        eval_path = local(spec.dataset.eval.uri, "eval", eval_ref.name if eval_ref else None)
    out_ref = spec.output.credentials_secret_ref
    output = local(spec.output.uri, "output", out_ref.name if out_ref else None, write=True)
    layout.paths = ResolvedPaths(
        base_model=base, train_data=train, eval_data=eval_path, output_dir=output
    )
    compare = spec.evaluation.compare_with
    if compare is not None:
        secret = compare.credentials_secret_ref.name if compare.credentials_secret_ref else None
        compared = StorageUri.parse(compare.uri)
        if compared.scheme in ("pvc", "file"):
            layout.paths.compared_adapter = local(compare.uri, COMPARE_FETCH, None)
        else:
            layout.compare_fetch = (compare.uri, compare.digest, secret)
            layout.paths.compared_adapter = compared.fetched_path(f"{INPUTS_DIR}/{COMPARE_FETCH}")
            layout.paths.compared_fetch_error = COMPARE_FETCH_ERROR

    for claim, writable in sorted(claims.items()):
        vol = _volume_name(claim)
        layout.volumes.append(
            {"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}}
        )
        layout.mounts.append(
            {"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable}
        )
    if layout.fetches or layout.compare_fetch:
        layout.volumes.append({"name": "inputs", "emptyDir": {}})
        layout.mounts.append({"name": "inputs", "mountPath": INPUTS_DIR})
    if output == OUTPUT_DIR:
        layout.volumes.append({"name": "output", "emptyDir": {}})
        layout.mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
    return layout


# ---------------------------------------------------------------- ConfigMap


def resolve_trainer_config(
    name: str,
    namespace: str,
    generation: int,
    spec: FineTuneJobSpec,
    *,
    batch_size: int | None,
    gradient_checkpointing: bool | None,
    config: OperatorConfig,
) -> TrainerConfig:
    """The TrainerConfig for this run, with the estimator's choices filled in."""
    training = spec.training.model_copy(
        update={
            k: v
            for k, v in (
                ("batch_size", batch_size),
                ("gradient_checkpointing", gradient_checkpointing),
            )
            if v is not None
        }
    )
    resolved = spec.model_copy(update={"training": training})
    return TrainerConfig(
        job_name=name,
        namespace=namespace,
        generation=generation,
        spec=resolved,
        paths=pod_paths(spec).paths,
        device="auto" if spec.resources.gpus == 0 else "cuda",
        progress_interval_seconds=config.progress_interval_seconds,
        termination_log=TERMINATION_LOG,
    )


def trainer_configmap(
    name: str,
    namespace: str,
    generation: int,
    trainer_config: TrainerConfig,
    owner: dict[str, Any],
    spec_hash: str,
) -> dict[str, Any]:
    """ConfigMap holding ``job.yaml`` (the TrainerConfig), immutable per generation."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": trainer_configmap_name(name, generation),
            "namespace": namespace,
            "labels": child_labels(name, generation),
            "annotations": {ANNOTATION_SPEC_HASH: spec_hash},
            "ownerReferences": [owner],
        },
        "immutable": True,
        "data": {
            CONFIG_KEY: yaml.dump(trainer_config.to_wire(), Dumper=_YAML_DUMPER, sort_keys=True)
        },
    }


# ---------------------------------------------------------------- Job


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _common_env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _fetch_container(
    name: str, uri: str, secret: str | None, image: str, config: OperatorConfig
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": f"fetch-{name}",
        "image": image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["python", "-m", "finetune_trainer.fetch"],
        "args": ["--uri", uri, "--dest", f"{INPUTS_DIR}/{name}"],
        "env": _common_env(),
        "volumeMounts": [
            {"name": "inputs", "mountPath": INPUTS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # Requests from the platform policy: no container of a trainer pod is BestEffort.
        "resources": init_resources(config.policy),
    }
    if secret:
        # Only the name of the Secret travels; the kubelet injects its values.
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    return container


def _compare_fetch_container(
    layout: PodLayout, image: str, config: OperatorConfig
) -> list[dict[str, Any]]:
    """The fetch step of evaluation.compareWith: checks the digest, and on any failure leaves
    the message in a file and exits 0, so the run goes on with its own evaluation."""
    if layout.compare_fetch is None:
        return []
    uri, digest, secret = layout.compare_fetch
    container = _fetch_container(COMPARE_FETCH, uri, secret, image, config)
    container["args"] += ["--digest", digest, "--error-file", COMPARE_FETCH_ERROR]
    return [container]


def trainer_job(
    name: str,
    namespace: str,
    generation: int,
    spec: FineTuneJobSpec,
    owner: dict[str, Any],
    config: OperatorConfig,
    spec_hash: str,
) -> dict[str, Any]:
    """The batch/v1 Job that runs ``finetune-trainer train`` for one generation."""
    image = spec.image or config.trainer_image
    layout = pod_paths(spec)
    labels = child_labels(name, generation)
    res = spec.resources

    # CPU and memory: the job's own, else the platform policy's defaults (never none).
    resources = trainer_resources(spec, config.policy)
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if res.gpus > 0:
        limits[GPU_RESOURCE] = res.gpus
        requests[GPU_RESOURCE] = res.gpus
    requests.update(resources["requests"])
    limits.update(resources["limits"])

    env = [
        *_common_env(),
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        # The host memory the fit check planned activation offload with (packed_memory).
        {
            "name": "FINETUNE_HOST_MEMORY_BYTES",
            "valueFrom": {
                "resourceFieldRef": {
                    "containerName": TRAINER_CONTAINER,
                    "resource": "requests.memory",
                }
            },
        },
    ]
    trainer: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["finetune-trainer"],
        "args": ["train", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "env": env,
        "resources": {"limits": limits, "requests": requests},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *layout.mounts,
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }
    out_ref = spec.output.credentials_secret_ref
    if out_ref and StorageUri.parse(spec.output.uri).scheme == "s3":
        trainer["envFrom"] = [{"secretRef": {"name": out_ref.name}}]

    node_selector = dict(res.node_selector)
    if res.gpu_product and res.gpus > 0:
        node_selector[GPU_PRODUCT_LABEL] = res.gpu_product
    tolerations = [t.to_wire() for t in res.tolerations]
    if res.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "fsGroup": config.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [
            *(
                _fetch_container(fname, uri, secret, image, config)
                for fname, uri, secret in layout.fetches
            ),
            *_compare_fetch_container(layout, image, config),
        ],
        "containers": [trainer],
        "volumes": [
            {
                "name": "config",
                "configMap": {"name": trainer_configmap_name(name, generation)},
            },
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            *layout.volumes,
        ],
        "tolerations": tolerations,
    }
    if not pod_spec["initContainers"]:
        del pod_spec["initContainers"]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if res.affinity:
        pod_spec["affinity"] = res.affinity.to_wire()
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name

    job_labels = dict(labels)
    if res.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = res.queue_name
    ttl = (
        config.job_ttl_seconds
        if config.job_ttl_seconds is not None
        else spec.ttl_seconds_after_finished
    )
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "ttlSecondsAfterFinished": ttl,
        # Kueue admits a queued Job by unsuspending it; it must be created suspended.
        "suspend": bool(res.queue_name) or spec.suspend,
        "podFailurePolicy": {
            "rules": [
                # Evictions and preemptions: the trainer resumes from its checkpoint.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                # Bad config or unusable data: retrying cannot help.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
            ]
        },
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": trainer_job_name(name, generation),
            "namespace": namespace,
            "labels": job_labels,
            "annotations": {ANNOTATION_SPEC_HASH: spec_hash},
            "ownerReferences": [owner],
        },
        "spec": job_spec,
    }
