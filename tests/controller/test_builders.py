"""The trainer Job and ConfigMap builders: pure functions, checked field by field."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.builders import (
    names,
    owner_reference,
    resolve_trainer_config,
    trainer_configmap,
    trainer_job,
)
from finetune_operator.config import OperatorConfig
from support.ftj_samples import spec

CONFIG = OperatorConfig(trainer_image="registry.example/trainer:1.0")
OWNER = owner_reference("FineTuneJob", "bot", "uid-1")


def build(name: str = "bot", generation: int = 1, **overrides: Any) -> dict[str, Any]:
    parsed = FineTuneJobSpec.model_validate(spec(**overrides))
    return trainer_job(name, "team-a", generation, parsed, OWNER, CONFIG, "hash123")


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec(job)["containers"] if c["name"] == "trainer")


def test_job_is_a_valid_batch_v1_job() -> None:
    job = build(
        resources={
            "gpus": 2,
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            "queueName": "gpu",
            "priorityClassName": "high",
        }
    )
    kubernetes_validate.validate(job, "1.33.0", strict=True)


@pytest.mark.parametrize(
    ("name", "generation"),
    [
        ("bot", 1),
        ("a" * 63, 7),
        ("x" * 253, 12345),
        ("support-bot-with-a-very-long-descriptive-name-for-team-a", 3),
    ],
)
def test_job_name_is_deterministic_and_fits_63_chars(name: str, generation: int) -> None:
    first = names.trainer_job_name(name, generation)
    assert first == names.trainer_job_name(name, generation)
    assert len(first) <= 63
    assert first.endswith(f"-train-g{generation}")
    assert names.trainer_job_name(name + "x", generation) != first
    assert len(names.label_value(name)) <= 63


def test_short_names_are_kept_readable() -> None:
    assert names.trainer_job_name("bot", 4) == "bot-train-g4"
    assert names.trainer_configmap_name("bot", 4) == "bot-trainer-g4"


def test_gpu_resources_and_scheduling() -> None:
    job = build(
        resources={
            "gpus": 2,
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            "nodeSelector": {"pool": "train"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "zone", "operator": "In", "values": ["a"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "priorityClassName": "training-low",
            "cpu": "8",
            "memory": "64Gi",
        }
    )
    ps = pod_spec(job)
    assert trainer(job)["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "64Gi"}
    assert trainer(job)["resources"]["requests"]["cpu"] == "8"
    assert ps["nodeSelector"] == {
        "pool": "train",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in ps[
        "tolerations"
    ]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ps[
        "tolerations"
    ]
    assert ps["affinity"]["nodeAffinity"]
    assert ps["priorityClassName"] == "training-low"


def test_cpu_training_requests_no_gpu() -> None:
    job = build(resources={"gpus": 0})
    assert "nvidia.com/gpu" not in trainer(job)["resources"]["limits"]
    assert "nodeSelector" not in pod_spec(job)


@pytest.mark.parametrize(
    ("queue", "suspend", "expected"),
    [(None, False, False), (None, True, True), ("gpu-queue", False, True)],
)
def test_kueue_jobs_start_suspended_with_the_queue_label(
    queue: str | None, suspend: bool, expected: bool
) -> None:
    resources: dict[str, Any] = {"gpus": 1}
    if queue:
        resources["queueName"] = queue
    job = build(resources=resources, suspend=suspend)
    assert job["spec"]["suspend"] is expected
    assert job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == queue


def test_pod_is_locked_down() -> None:
    ps = pod_spec(build())
    assert ps["automountServiceAccountToken"] is False
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert ps["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in ps["containers"] + ps.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_job_failure_policy_deadline_ttl_and_owner() -> None:
    job = build(backoffLimit=5, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=600)
    js = job["spec"]
    assert js["backoffLimit"] == 5
    assert js["activeDeadlineSeconds"] == 7200
    assert js["ttlSecondsAfterFinished"] == 600
    assert js["template"]["spec"]["restartPolicy"] == "Never"
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2, 3]
    assert job["metadata"]["ownerReferences"] == [OWNER]
    assert OWNER["controller"] is True and OWNER["kind"] == "FineTuneJob"
    assert job["metadata"]["annotations"]["finetune.dev/spec-hash"] == "hash123"


def test_operator_ttl_override() -> None:
    parsed = FineTuneJobSpec.model_validate(spec())
    job = trainer_job("bot", "ns", 1, parsed, OWNER, OperatorConfig(job_ttl_seconds=60), "h")
    assert job["spec"]["ttlSecondsAfterFinished"] == 60


def test_pvc_inputs_mount_read_only_and_output_writable() -> None:
    job = build()
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["pvc-datasets"]["persistentVolumeClaim"] == {
        "claimName": "datasets",
        "readOnly": True,
    }
    assert volumes["pvc-adapters"]["persistentVolumeClaim"] == {
        "claimName": "adapters",
        "readOnly": False,
    }
    mounts = {m["name"]: m for m in trainer(job)["volumeMounts"]}
    assert mounts["pvc-datasets"]["readOnly"] is True
    assert mounts["pvc-adapters"]["readOnly"] is False


def test_one_claim_for_input_and_output_is_mounted_once_writable() -> None:
    job = build(
        dataset={"train": {"uri": "pvc://work/data/train.jsonl"}}, output={"uri": "pvc://work/out"}
    )
    claims = [v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [
        {"name": "pvc-work", "persistentVolumeClaim": {"claimName": "work", "readOnly": False}}
    ]


def test_hf_and_s3_inputs_are_fetched_by_init_containers_with_only_their_secret() -> None:
    job = build(
        dataset={
            "train": {
                "uri": "s3://corp-data/support/train.jsonl",
                "credentialsSecretRef": {"name": "s3-creds"},
            },
            "eval": {"uri": "hf://datasets/acme/support@v2/eval.jsonl"},
        }
    )
    inits = {c["name"]: c for c in pod_spec(job)["initContainers"]}
    assert set(inits) == {"fetch-model", "fetch-train", "fetch-eval"}
    assert inits["fetch-model"]["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert inits["fetch-train"]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "envFrom" not in inits["fetch-eval"]
    assert "envFrom" not in trainer(job)  # the trainer never sees input credentials
    assert inits["fetch-train"]["args"] == [
        "--uri",
        "s3://corp-data/support/train.jsonl",
        "--dest",
        "/work/inputs/train",
    ]
    assert any(v["name"] == "inputs" and v["emptyDir"] == {} for v in pod_spec(job)["volumes"])
    env = {e["name"]: e.get("value") for e in trainer(job)["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"


def test_trainer_config_has_local_paths_and_resolved_choices() -> None:
    parsed = FineTuneJobSpec.model_validate(
        spec(
            training={"batchSize": "auto", "gradientCheckpointing": None},
            dataset={
                "train": {"uri": "s3://corp-data/support/train.jsonl"},
                "eval": {"uri": "pvc://datasets/eval.jsonl"},
            },
        )
    )
    tc = resolve_trainer_config(
        "bot", "team-a", 3, parsed, batch_size=8, gradient_checkpointing=False, config=CONFIG
    )
    assert tc.paths.base_model == "/work/inputs/model"
    assert tc.paths.train_data == "/work/inputs/train/train.jsonl"
    assert tc.paths.eval_data == "/mnt/pvc/datasets/eval.jsonl"
    assert tc.paths.output_dir == "/mnt/pvc/adapters/support-bot"
    assert tc.spec.training.batch_size == 8
    assert tc.spec.training.gradient_checkpointing is False
    assert tc.device == "cuda"

    cm = trainer_configmap("bot", "team-a", 3, tc, OWNER, "hash")
    assert cm["metadata"]["name"] == "bot-trainer-g3"
    assert cm["immutable"] is True
    loaded = TrainerConfig.model_validate(yaml.safe_load(cm["data"]["job.yaml"]))
    assert loaded == tc
    kubernetes_validate.validate(cm, "1.33.0", strict=True)


def test_unresolved_auto_stays_auto_for_the_trainer() -> None:
    parsed = FineTuneJobSpec.model_validate(
        spec(training={"batchSize": "auto", "gradientCheckpointing": None})
    )
    tc = resolve_trainer_config(
        "bot", "ns", 1, parsed, batch_size=None, gradient_checkpointing=None, config=CONFIG
    )
    assert tc.spec.training.batch_size == "auto"
    assert tc.spec.training.gradient_checkpointing is None


def _secret_refs(node: Any, where: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretRef", "secretKeyRef", "secret"):
                found.append((f"{where}.{key}", value))
            found += _secret_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _secret_refs(value, f"{where}[{i}]")
    return found


def test_secrets_reach_the_pod_only_by_name_and_only_in_fetch_steps() -> None:
    job = build(
        output={"uri": "s3://corp-out/adapters", "credentialsSecretRef": {"name": "s3-out"}}
    )
    refs = _secret_refs(job)
    assert refs, "the Secrets should be referenced"
    for where, ref in refs:
        assert ref in ({"name": "hf-token"}, {"name": "s3-out"}), (where, ref)
        # Input credentials go to fetch steps; only an s3:// output gives the trainer its own.
        assert "initContainers" in where or ref == {"name": "s3-out"}
    parsed = FineTuneJobSpec.model_validate(spec())
    tc = resolve_trainer_config(
        "bot", "ns", 1, parsed, batch_size=4, gradient_checkpointing=True, config=CONFIG
    )
    assert _secret_refs(trainer_configmap("bot", "ns", 1, tc, OWNER, "h")) == []


def test_long_claim_names_sharing_a_prefix_get_distinct_valid_volume_names() -> None:
    stem = "team-a-shared-datasets-for-the-support-assistant-fine-tuning"
    job = build(
        baseModel={"uri": f"pvc://{stem}-models/llama"},
        dataset={"train": {"uri": f"pvc://{stem}-data/train.jsonl"}},
        output={"uri": f"pvc://{stem}-out/adapter"},
    )
    volumes = [v["name"] for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    assert len(volumes) == 3 and len(set(volumes)) == 3
    assert all(len(v) <= 63 and v[-1].isalnum() for v in volumes)
    kubernetes_validate.validate(job, "1.33.0", strict=True)


def test_trainer_learns_its_memory_request_for_activation_offload() -> None:
    job = build(resources={"gpus": 1, "memory": "24Gi"})
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    env = {e["name"]: e for e in trainer(job)["env"]}
    ref = env["FINETUNE_HOST_MEMORY_BYTES"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": trainer(job)["name"], "resource": "requests.memory"}
    assert trainer(job)["resources"]["requests"]["memory"] == "24Gi"


CHAMPION_DIGEST = "sha256:" + "c" * 64


def test_a_compared_s3_adapter_is_fetched_by_an_optional_step_with_only_its_secret() -> None:
    compare = {"uri": "s3://corp-models/bot/weekly-1/adapter", "digest": CHAMPION_DIGEST,
               "credentialsSecretRef": {"name": "s3-out"}}  # fmt: skip
    parsed = FineTuneJobSpec.model_validate(spec(evaluation={"compareWith": compare}))
    job = trainer_job("bot", "team-a", 1, parsed, OWNER, CONFIG, "hash123")
    inits = {c["name"]: c for c in pod_spec(job)["initContainers"]}
    fetch = inits["fetch-compare"]
    # The digest is checked while fetching; a failure is written down and the pod goes on.
    assert fetch["args"] == ["--uri", compare["uri"], "--dest", "/work/inputs/compare",
                             "--digest", CHAMPION_DIGEST,
                             "--error-file", "/work/inputs/compare-fetch-error.txt"]  # fmt: skip
    assert fetch["envFrom"] == [{"secretRef": {"name": "s3-out"}}]
    paths = resolve_trainer_config(
        "bot", "team-a", 1, parsed, batch_size=4, gradient_checkpointing=True, config=CONFIG
    ).paths
    assert paths.compared_adapter == "/work/inputs/compare"
    assert paths.compared_fetch_error == "/work/inputs/compare-fetch-error.txt"


def test_a_compared_pvc_adapter_is_mounted_read_only() -> None:
    compare = {"uri": "pvc://champions/bot/adapter", "digest": CHAMPION_DIGEST}
    parsed = FineTuneJobSpec.model_validate(spec(evaluation={"compareWith": compare}))
    job = trainer_job("bot", "team-a", 1, parsed, OWNER, CONFIG, "hash123")
    assert not any(c["name"] == "fetch-compare" for c in pod_spec(job).get("initContainers", []))
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims["champions"] is True
    paths = resolve_trainer_config(
        "bot", "team-a", 1, parsed, batch_size=4, gradient_checkpointing=True, config=CONFIG
    ).paths
    assert paths.compared_adapter == "/mnt/pvc/champions/bot/adapter"
    assert paths.compared_fetch_error is None
