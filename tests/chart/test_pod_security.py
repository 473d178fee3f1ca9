"""The pods the project runs meet the `restricted` Pod Security Standard, as the docs promise:
the operator pod from the chart and the trainer pods the operator creates."""

from __future__ import annotations

from typing import Any

import pytest
from chartlib import manifests, one

kubernetes_validate = pytest.importorskip("kubernetes_validate")

# Volume types the restricted profile allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """Checks of the Kubernetes `restricted` Pod Security Standard (v1.29+)."""
    problems: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host):
            problems.append(f"{host} is set")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} uses {kinds - RESTRICTED_VOLUMES}")
    containers = (pod_spec.get("initContainers") or []) + pod_spec["containers"]
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps.get('add')}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort")
    return problems


def test_checker_rejects_an_unhardened_pod() -> None:
    pod = {"containers": [{"name": "c", "image": "x"}], "hostNetwork": True}
    problems = restricted_violations(pod)
    assert "hostNetwork is set" in problems
    assert any("allowPrivilegeEscalation" in p for p in problems)
    assert any("capabilities" in p for p in problems)


@pytest.mark.parametrize(
    "values", [{}, {"watchNamespaces": ["team-a"], "operator": {"verbose": True}}]
)
def test_operator_pod_is_restricted(values: dict[str, Any]) -> None:
    deployment = one(manifests(values), "Deployment")
    assert restricted_violations(deployment["spec"]["template"]["spec"]) == []


def trainer_job_for(spec_overrides: dict[str, Any]) -> dict[str, Any]:
    from controller.ftj_samples import spec as sample_spec
    from finetune_operator.api.finetunejob import FineTuneJobSpec
    from finetune_operator.builders.trainer import trainer_job
    from finetune_operator.config import load_config

    spec = FineTuneJobSpec.model_validate(sample_spec(**spec_overrides))
    chart_env = {
        e["name"]: e["value"]
        for e in one(manifests(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"].startswith("FINETUNE_") and "value" in e
    }
    config = load_config(chart_env)
    return trainer_job(
        "support-bot",
        "team-a",
        1,
        spec,
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "support-bot",
            "uid": "u-1",
        },
        config,
        "hash",
    )


TRAINER_CASES = {
    "pvc inputs": {},
    "hub model with a token, s3 output": {
        "baseModel": {
            "uri": "hf://meta-llama/Llama-3.1-8B@main",
            "credentialsSecretRef": {"name": "hf-token"},
        },
        "output": {
            "uri": "s3://adapters/support-bot",
            "credentialsSecretRef": {"name": "s3-creds"},
        },
    },
}


@pytest.mark.parametrize("overrides", list(TRAINER_CASES.values()), ids=list(TRAINER_CASES))
def test_trainer_pods_are_restricted_and_get_no_token(overrides: dict[str, Any]) -> None:
    job = trainer_job_for(overrides)
    kubernetes_validate.validate(job, "1.37", strict=True)
    pod = job["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    assert pod.get("serviceAccountName") in (None, "default")
    # The chart runs trainer pods as the trainer image's own user.
    assert pod["securityContext"]["runAsUser"] == 65532
