"""The pods the project runs meet the `restricted` Pod Security Standard, as the docs promise:
the operator pod from the chart and the trainer pods the operator creates."""

from __future__ import annotations

from typing import Any

import pytest
from support.chartlib import manifests, one
from support.pod_security import restricted_violations

kubernetes_validate = pytest.importorskip("kubernetes_validate")


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
    from finetune_operator.api.finetunejob import FineTuneJobSpec
    from finetune_operator.builders.trainer import trainer_job
    from finetune_operator.config import load_config
    from support.ftj_samples import spec as sample_spec

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
