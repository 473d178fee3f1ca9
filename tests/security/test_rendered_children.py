"""Everything the operator makes for many different FineTuneJobs, made for real against the
embedded API: trainer pods are hardened and get no API token, and credentials are only ever
referenced from Secrets, never copied into ConfigMaps, Jobs, status or events."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_operator.builders.names import LABEL_JOB
from support.cluster import NS, add_prerequisites, ftj_body, start_operator, status
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for
from support.pod_security import restricted_violations

SECRETS = {
    "hf-token": {"HF_TOKEN": "hf_sec_marker_HFTOKEN_0001"},
    "s3-creds": {
        "AWS_ACCESS_KEY_ID": "AKIA_sec_marker_0002",
        "AWS_SECRET_ACCESS_KEY": "sec_marker_AWS_0003",
    },
    "gcs-creds": {"GOOGLE_APPLICATION_CREDENTIALS_JSON": '{"private_key": "sec_marker_0004"}'},
}
MARKERS = [v for data in SECRETS.values() for v in data.values()]

SPECS: dict[str, dict[str, Any]] = {
    "pvc-only": spec(baseModel={"uri": "pvc://datasets/models/llama-3-8b"}),
    "hub-token": spec(),
    "s3-output": spec(
        output={"uri": "s3://adapters/bot", "credentialsSecretRef": {"name": "s3-creds"}}
    ),
    "s3-data-two-secrets": spec(
        dataset={
            "train": {
                "uri": "s3://bucket-a/train.jsonl",
                "credentialsSecretRef": {"name": "gcs-creds"},
            },
            "eval": {
                "uri": "s3://bucket-b/eval.jsonl",
                "credentialsSecretRef": {"name": "s3-creds"},
            },
        }
    ),
    "two-nodes": spec(resources={"gpus": 1, "nodes": 2, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}),
    "queued": spec(
        resources={"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "queueName": "gpu"}
    ),
    "merged-output": spec(output={"uri": "pvc://adapters/bot", "mergeAndUnload": True}),
}


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _references(container: dict[str, Any]) -> set[str]:
    names = {(r.get("secretRef") or {}).get("name") for r in container.get("envFrom") or []}
    names |= {
        ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
        for e in container.get("env") or []
    }
    return {n for n in names if n}


def test_children_of_many_specs_are_hardened_and_hold_no_credentials(
    emulator: Emulator, operator_runner: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    add_prerequisites(emulator, secrets=())
    for name, data in SECRETS.items():
        emulator.create(_secret(name, data))
    start_operator(emulator, operator_runner)
    accepted = []
    for name, body in SPECS.items():
        try:
            emulator.create(ftj_body(name, body), keep_status=False)
            accepted.append(name)
        except Exception as exc:  # a sample the API itself refuses is reported, not hidden
            pytest.fail(f"sample {name} was refused by the API: {exc}")
    for name in accepted:
        wait_for(lambda n=name: status(emulator, n).get("trainerJob"), 20,
                 what=lambda n=name: f"{n} started: {status(emulator, n)}")  # fmt: skip
    jobs = emulator.read_all("jobs", NS)
    assert len(jobs) == len(SPECS)
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        where = job["metadata"]["name"]
        assert restricted_violations(pod) == [], where
        assert pod["automountServiceAccountToken"] is False, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env") or []:
                # Literal values are settings, never anything read from a Secret.
                assert not any(m in str(env.get("value", "")) for m in MARKERS), (where, env)
            # The trainer itself only holds the output credentials (it uploads the adapter).
            if container["name"] == "trainer":
                out = (SPECS[job["metadata"]["labels"][LABEL_JOB]]["output"]
                       .get("credentialsSecretRef") or {}).get("name")  # fmt: skip
                assert _references(container) <= ({out} if out else set()), (where, container)
    wait_for(
        lambda: (
            sum(e["reason"] == "JobCreated" for e in emulator.read_all("events", NS)) >= len(SPECS)
        ),
        what="events",
    )
    scanned = json.dumps(
        {
            "objects": [o for o in emulator.objects() if o.get("kind") != "Secret"],
            "log": caplog.text,
        }
    )
    encoded = [base64.b64encode(m.encode()).decode() for m in MARKERS]
    leaked = [m for m in MARKERS + encoded if m in scanned]
    assert leaked == [], f"Secret values outside Secrets: {leaked}"
