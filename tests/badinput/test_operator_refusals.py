"""Specs the operator must refuse with a condition that names what to fix, making no child, and
never echoing a Secret's value into status, events or logs."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from support.adapters import make_adapter
from support.cluster import (
    NS,
    add_prerequisites,
    events,
    ftj_body,
    start_operator,
    status,
    trainer_jobs,
    wait_condition,
    wait_job,
)
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for
from support.serving_env import (
    Env,
    adapter_deployment,
    env_with_every_handler,
    uri_source,
    vllm_deployment,
)

SECRET_VALUE = "hf_canary_V4LUE_must_never_leak_7781"


def secret(name: str, key: str = "HF_TOKEN") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {key: base64.b64encode(SECRET_VALUE.encode()).decode()},
    }


def no_children(emulator: Emulator) -> None:
    assert trainer_jobs(emulator) == []
    assert emulator.read_all("configmaps", NS) == []
    assert emulator.read_all("services", NS) == []


def test_missing_pvc_is_named_and_nothing_is_made(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator, pvcs=("adapters",))  # the datasets claim is missing
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    cond = wait_condition(emulator, "bot", "Validated", "False", "ReferenceNotFound")
    assert "PersistentVolumeClaim 'datasets'" in cond["message"]
    assert "create it" in cond["message"]
    no_children(emulator)
    wait_for(lambda: any(e["reason"] == "ReferenceNotFound" for e in events(emulator, "bot")))
    add_prerequisites(emulator, pvcs=("datasets",), secrets=())
    wait_job(emulator, "bot-train-g1", timeout=40)


def test_missing_secret_and_pvc_are_both_named(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator, pvcs=("datasets",), secrets=())
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    cond = wait_condition(emulator, "bot", "Validated", "False", "ReferenceNotFound")
    assert "PersistentVolumeClaim 'adapters'" in cond["message"]
    assert "Secret 'hf-token'" in cond["message"]
    no_children(emulator)


BAD_SPECS = {
    "quantization-without-qlora": spec(method="lora", quantization={"type": "nf4"}),
    "does-not-fit": spec(
        method="lora",
        training={"maxSeqLength": 2048, "batchSize": 4, "gradientCheckpointing": False},
        resources={"gpus": 1, "gpuProduct": "NVIDIA-L4"},
    ),
}


def test_secret_values_stay_in_secrets(
    emulator: Emulator, operator_runner, caplog: pytest.LogCaptureFixture
) -> None:
    """Good and rejected specs that reference a Secret: its value appears nowhere but there."""
    caplog.set_level(logging.DEBUG)
    add_prerequisites(emulator, secrets=())
    emulator.create(secret("hf-token"))
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("good", spec()), keep_status=False)
    for name, body in BAD_SPECS.items():
        emulator.create(ftj_body(name, body), keep_status=False)
    missing = spec(baseModel={"uri": "hf://org/m", "credentialsSecretRef": {"name": "absent"}})
    emulator.create(ftj_body("missing-secret", missing), keep_status=False)
    job = wait_job(emulator, "good-train-g1")
    for name in [*BAD_SPECS, "missing-secret"]:
        wait_for(lambda n=name: status(emulator, n).get("phase") == "Failed"
                 or any(c.get("status") == "False" and c["type"] == "Validated"
                        for c in status(emulator, n).get("conditions") or []),
                 what=f"{name} rejected")  # fmt: skip
    # The token travels by reference only, and only to the container that downloads the model.
    pod = job["spec"]["template"]["spec"]
    holders = [
        c["name"]
        for c in pod.get("initContainers", []) + pod["containers"]
        if any((r.get("secretRef") or {}).get("name") == "hf-token" for r in c.get("envFrom") or [])
        or any(
            ((e.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name") == "hf-token"
            for e in c.get("env") or []
        )
    ]
    assert holders and "trainer" not in holders, holders
    wait_for(lambda: any(e["reason"] == "JobCreated" for e in events(emulator, "good")))
    everything = json.dumps(
        {
            "objects": [o for o in emulator.objects() if o.get("kind") != "Secret"],
            "log": caplog.text,
        }
    )
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    assert SECRET_VALUE not in everything and encoded not in everything
    assert "hf-token" in everything  # the name may be shown, and is


# ------------------------------------------------------------------ AdapterDeployment


@pytest.fixture
def env(
    emulator: Emulator,
    operator_runner: Any,
    tmp_path: Path,
) -> Iterator[Env]:
    yield from env_with_every_handler(emulator, operator_runner, tmp_path)


def _refused(env: Env, name: str) -> dict[str, Any]:
    wait_for(lambda: env.condition(name, "SourceReady").get("status") == "False", 10,
             what=lambda: f"{name} refused: {env.status(name)}")  # fmt: skip
    return env.condition(name, "SourceReady")


def test_wrong_digest_is_refused_and_names_both_digests(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    untouched = env.deployment()["spec"]
    wrong = "sha256:" + "0" * 64
    env.api.create(adapter_deployment("support", uri_source(uri, wrong)))
    cond = _refused(env, "support")
    assert cond["reason"] == "DigestMismatch"
    assert wrong in cond["message"] and digest in cond["message"]
    assert "source.digest" in cond["message"]
    assert env.deployment()["spec"] == untouched
    assert env.api.read("deployments", NS, "support-canary") is None


def test_tampered_adapter_files_are_refused(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    (env.root / "v1" / "adapter_model.safetensors").write_bytes(b"swapped weights")
    env.api.create(vllm_deployment())
    untouched = env.deployment()["spec"]
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    cond = _refused(env, "support")
    assert cond["reason"] == "DigestMismatch"
    assert "adapter_model.safetensors" in cond["message"] and "manifest" in cond["message"]
    assert env.deployment()["spec"] == untouched
    assert env.status("support")["phase"] == "Failed"
