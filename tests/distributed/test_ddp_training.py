"""Two processes train the tiny model with DDP (gloo, CPU) through the real CLI and torchrun.

The same ``finetune-trainer train`` command as in the pod, with ``--nproc-per-node 2``: the
launcher starts ``torch.distributed.run``, both ranks train, rank 0 alone writes the adapter,
the manifest and the protocol lines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import PROGRESS_PREFIX

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INTENTS = ["refund", "question", "complaint", "cancel", "upgrade", "invoice", "delivery", "login"]
TIMEOUT = 1200


def rows(n: int = 48) -> list[dict[str, Any]]:
    return [
        {
            "prompt": f"Ticket {i}: customer wants {INTENTS[i % 8]}. Answer in JSON.",
            "completion": json.dumps({"intent": INTENTS[i % 8], "priority": "high"}),
            "task": "json",
        }
        for i in range(n)
    ]


def config(model: Path, train: Path, out: Path, **training: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "file:///models/tiny"},
        "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "maxSteps": 6,
            "learningRate": 5e-3,
            "batchSize": 2,
            "gradientAccumulation": 2,
            "gradientCheckpointing": False,
            "optimizer": "adamw_torch",
            "maxSeqLength": 96,
            "checkpointEverySteps": 2,
            "loggingEverySteps": 1,
            "warmupRatio": 0.0,
            **training,
        },
        "resources": {"gpus": 0},
        "output": {"uri": "file:///out"},
    }
    return {
        "jobName": "ddp-test",
        "spec": spec,
        "paths": {"baseModel": str(model), "trainData": str(train), "outputDir": str(out)},
        "device": "cpu",
        "progressIntervalSeconds": 0,
        "terminationLog": str(out / "termination-log"),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def train(cfg: dict[str, Any], path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(cfg), encoding="utf-8")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image")]),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(path)]
    # A free port rather than torchrun's 29500: another run on the machine may hold that one.
    port = ["--master-port", str(free_port())] if "--master-port" not in extra else []
    return subprocess.run(
        [*cmd, "--nproc-per-node", "2", *port, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def lines(stdout: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len(PROGRESS_PREFIX) :])
        for line in stdout.splitlines()
        if line.startswith(PROGRESS_PREFIX)
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tinymodel import build_tiny_model

    root = tmp_path_factory.mktemp("ddp")
    build_tiny_model(root / "model", initializer_range=0.3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return root


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = workdir / "out"
    cfg = config(workdir / "model", workdir / "train.jsonl", out)
    return train(cfg, workdir / "job.json"), out


def test_two_ranks_train_one_adapter(
    first_run: tuple[subprocess.CompletedProcess[str], Path], workdir: Path
) -> None:
    proc, out = first_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = lines(proc.stdout)
    # Only rank 0 speaks: one data report, one result, progress up to the last step once.
    assert [o["type"] for o in found].count("data") == 1
    results = [o for o in found if o["type"] == "result"]
    assert len(results) == 1 and results[0]["ok"] is True, results
    result = results[0]
    assert json.loads((out / "termination-log").read_text()) == result
    progress = [o for o in found if o["type"] == "progress"]
    assert max(p["step"] for p in progress) == 6
    assert [p["step"] for p in progress].count(1) == 1
    losses = [p["loss"] for p in progress if p.get("loss") is not None]
    assert all(loss == loss and loss < 1e6 for loss in losses)  # finite
    assert losses[-1] < losses[0] - 0.5, losses

    # The adapter format is the single-GPU one: manifest verifies, peft loads it.
    from finetune_operator.domain.adapter_digest import digest_of_files, verify_directory
    from finetune_trainer.manifest import verify

    adapter = out / "adapter"
    digest = verify(adapter)
    assert digest == result["adapter"]["digest"]
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["digest"] == digest_of_files(manifest["files"]) == verify_directory(adapter)
    args = manifest["trainingArguments"]
    assert args["worldSize"] == 2
    assert args["gradientAccumulation"] == 2
    assert args["globalBatchSize"] == 4  # batchSize 2 x accumulation 2, as on one GPU

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init
    # Rank 0 evaluated the adapter after training.
    assert "evalLoss" in result["metrics"]


def test_all_ranks_resume_from_the_same_checkpoint(
    first_run: tuple[subprocess.CompletedProcess[str], Path], workdir: Path
) -> None:
    proc, out = first_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoints = out / "checkpoints"
    saved = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert saved == ["checkpoint-4", "checkpoint-6"]
    # A pod killed while saving step 6: the newest checkpoint has no completion marker.
    (checkpoints / "checkpoint-6" / "checkpoint_complete.json").unlink()
    shutil.rmtree(out / "adapter")
    cfg = config(workdir / "model", workdir / "train.jsonl", out)
    again = train(cfg, workdir / "job-resume.json", "--no-eval")
    assert again.returncode == 0, again.stderr[-4000:]
    result = next(o for o in lines(again.stdout) if o["type"] == "result")
    assert result["ok"] is True and result["steps"] == 6
    progress = [o for o in lines(again.stdout) if o["type"] == "progress"]
    # Both ranks continued from step 4 (a rank starting over would hang or fail the run).
    assert min(p["step"] for p in progress) >= 5
    assert "checkpoint-4" in (out / "report.md").read_text()
    from finetune_trainer.manifest import verify

    verify(out / "adapter")


def test_a_data_failure_on_every_rank_is_reported_once_with_its_exit_code(
    workdir: Path,
) -> None:
    out = workdir / "out-bad"
    cfg = config(workdir / "model", workdir / "train.jsonl", out)
    cfg["spec"]["dataset"]["cleaning"] = {"minRows": 1000}
    proc = train(cfg, workdir / "job-bad.json")
    assert proc.returncode == 3, proc.stderr[-4000:]
    results = [o for o in lines(proc.stdout) if o["type"] == "result"]
    assert len(results) == 1
    assert results[0]["ok"] is False and results[0]["reason"] == "DataUnusable"
    assert "minRows" in results[0]["message"]
