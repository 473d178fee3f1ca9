"""End to end across the contract: the operator's ConfigMap drives the real trainer CLI on
CPU, and the trainer's real stdout and termination message drive the operator's status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from finetune_local import Emulator
from finetune_operator.domain.adapter_digest import digest_of_files, verify_directory
from support.cluster import (
    NS,
    add_prerequisites,
    ftj_body,
    start_operator,
    start_pod,
    status,
    wait_job,
    wait_phase,
)
from support.k8s_fixtures import wait_for

REPO = Path(__file__).resolve().parents[2]
INTENTS = ["refund", "question", "complaint", "cancel", "upgrade", "invoice", "delivery", "login"]

SPEC = {
    "baseModel": {"uri": "pvc://models/tiny"},
    "dataset": {"train": {"uri": "pvc://datasets/train.jsonl"}, "evalSplit": 0.2},
    "method": "lora",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "training": {
        "maxSteps": 4,
        "learningRate": 5e-3,
        "batchSize": 4,
        "gradientCheckpointing": False,
        "optimizer": "adamw_torch",
        "maxSeqLength": 96,
        "loggingEverySteps": 1,
        "warmupRatio": 0.0,
    },
    "resources": {"gpus": 0},
    "output": {"uri": "pvc://adapters/run"},
    "evaluation": {"maxNewTokens": 4, "maxSamples": 4},
    "qualityGates": [{"metric": "evalLoss", "max": 1000.0}],
}


@pytest.mark.slow
def test_real_trainer_output_becomes_a_recorded_adapter(
    emulator: Emulator, operator_runner, tmp_path: Path
) -> None:
    from finetune_trainer.tinymodel import build_tiny_model

    volumes = tmp_path / "volumes"
    build_tiny_model(volumes / "models" / "tiny")
    rows = [
        {
            "prompt": f"Ticket {i}: customer wants {INTENTS[i % 8]}. Answer in JSON.",
            "completion": json.dumps({"intent": INTENTS[i % 8]}),
            "task": "json",
        }
        for i in range(40)
    ]
    (volumes / "datasets").mkdir(parents=True)
    (volumes / "datasets" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    add_prerequisites(emulator, pvcs=("models", "datasets", "adapters"), secrets=())
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("run", SPEC), keep_status=False)
    job = wait_job(emulator, "run-train-g1")
    configmap = emulator.read("configmaps", NS, "run-trainer-g1")
    assert configmap is not None

    # The kubelet's part: mount the claims (here: folders) where the pod expects them.
    config = yaml.safe_load(configmap["data"]["job.yaml"].replace("/mnt/pvc/", f"{volumes}/"))
    config["device"] = "cpu"
    config["progressIntervalSeconds"] = 0
    config["terminationLog"] = str(tmp_path / "termination-log")
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config))

    pod = start_pod(emulator, job)
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer-image'}",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    emulator.set_pod_log(NS, pod, done.stdout)
    wait_for(
        lambda: (status(emulator, "run").get("progress") or {}).get("step") == 4,
        what="trainer progress",
    )
    emulator.terminate_container(
        NS,
        pod,
        exit_code=0,
        message=(tmp_path / "termination-log").read_text(),
        container="trainer",
    )
    emulator.set_job_finished(NS, "run-train-g1", succeeded=True)

    st = wait_phase(emulator, "run", "Succeeded", timeout=20)
    adapter_dir = volumes / "adapters" / "run" / "adapter"
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    assert st["adapter"]["uri"] == "pvc://adapters/run/adapter"
    assert st["adapter"]["digest"] == manifest["digest"] == digest_of_files(manifest["files"])
    assert verify_directory(adapter_dir) == manifest["digest"]
    assert st["metrics"]["evalLoss"] > 0
    assert st["data"]["trainRows"] + st["data"]["evalRows"] == st["data"]["rowsKept"]
    assert st["gatesSummary"] == "1/1 passed"
