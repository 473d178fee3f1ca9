"""The real CLI: end to end in a subprocess, failures with their exit codes, kill and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import PROGRESS_PREFIX
from support.trainer_samples import (
    REPO,
    held_after_step,
    json_task_rows,
    make_config,
    subprocess_env,
    write_config,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def _protocol_lines(stdout: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len(PROGRESS_PREFIX) :])
        for line in stdout.splitlines()
        if line.startswith(PROGRESS_PREFIX)
    ]


def _cli(config_path: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.cli",
            "train",
            "--config",
            str(config_path),
            *extra,
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_train_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", json_task_rows(40))
    out = tmp_path / "out"
    cfg = make_config(
        tiny_model,
        train,
        out,
        training={"maxSteps": 8, "checkpointEverySteps": 4, "loggingEverySteps": 2},
        output={"mergeAndUnload": True},
        dataset={"evalSplit": 0.2},
    )
    proc = _cli(write_config(tmp_path / "job.yaml", cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = _protocol_lines(proc.stdout)
    kinds = [x["type"] for x in lines]
    assert kinds[0] == "data" and kinds[-1] == "result" and "progress" in kinds
    data = lines[0]["report"]
    assert data["rowsRead"] == 40 and data["trainRows"] == 32 and data["evalRows"] == 8
    progress = [x for x in lines if x["type"] == "progress"]
    assert progress[-1]["step"] == 8 and progress[-1]["totalSteps"] == 8
    assert progress[-1]["tokensPerSecond"] > 0 and progress[-1]["updatedAt"].endswith("Z")
    assert any(p["loss"] is not None for p in progress)
    result = lines[-1]
    assert result["ok"] is True and result["steps"] == 8
    assert result["metrics"]["evalLoss"] > 0

    adapter = out / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    from finetune_trainer.manifest import verify

    manifest = json.loads((adapter / "manifest.json").read_text())
    assert verify(adapter) == manifest["digest"] == result["adapter"]["digest"]
    assert manifest["datasetDigest"] == data["digest"]
    assert manifest["trainingArguments"]["batchSize"] == 4
    assert result["adapter"]["uri"] == "file:///out/adapter"
    assert result["adapter"]["sizeBytes"] > 0 and result["adapter"]["rank"] == 8

    termination = json.loads((out / "termination-log").read_text())
    assert termination == {**result, "type": "result"}
    assert json.loads((out / "metrics.json").read_text()) == result["metrics"]
    assert len((out / "eval.jsonl").read_text().splitlines()) == 8
    assert json.loads((out / "data_report.json").read_text()) == data
    report = (out / "report.md").read_text()
    assert "# Fine-tuning report: test-job" in report and "loss_curve.svg" in report
    svg = ET.parse(out / "loss_curve.svg").getroot()
    assert svg.tag.endswith("svg")
    assert svg.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
    # Checkpoints kept: the last two.
    names = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-8"]


def _run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, Any]]]:
    from finetune_trainer.cli import main

    code = main(argv)
    return code, _protocol_lines(capsys.readouterr().out)


def test_unusable_data_fails_before_training(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json_task_rows(4) * 6  # 20 of 24 rows are duplicates
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, out))
    code, lines = _run_main(["train", "--config", str(cfg)], capsys)
    assert code == 3
    result = lines[-1]
    assert result["type"] == "result" and result["ok"] is False
    assert result["reason"] == "DataUnusable"
    assert "maxDuplicateRate" in result["message"]
    assert result["data"]["duplicates"] == 20
    assert json.loads((out / "termination-log").read_text())["reason"] == "DataUnusable"
    assert (out / "data_report.json").is_file()
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()

    code, lines = _run_main(["data-report", "--config", str(cfg)], capsys)
    assert code == 3 and lines[-1]["reason"] == "DataUnusable"


def test_missing_data_and_bad_config(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, tmp_path / "nope.jsonl", out))
    code, lines = _run_main(["train", "--config", str(cfg)], capsys)
    assert code == 3 and lines[-1]["reason"] == "DataNotFound"
    assert "nope.jsonl does not exist" in lines[-1]["message"]

    bad = make_config(tiny_model, tmp_path / "x.jsonl", out)
    bad["spec"]["training"]["learningRate"] = -1
    code, lines = _run_main(
        ["train", "--config", str(write_config(tmp_path / "b.json", bad))], capsys
    )
    assert code == 2 and lines[-1]["reason"] == "InvalidConfig"
    assert "spec.training.learningRate" in lines[-1]["message"]

    code, lines = _run_main(["train", "--config", str(tmp_path / "absent.yaml")], capsys)
    assert code == 2 and "not found" in lines[-1]["message"]

    missing_model = make_config(tmp_path / "no-model", tmp_path / "x.jsonl", out)
    code, lines = _run_main(
        ["train", "--config", str(write_config(tmp_path / "m.json", missing_model))], capsys
    )
    assert code == 4 and lines[-1]["reason"] == "ModelNotFound"


def test_data_report_command(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from finetune_trainer.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", json_task_rows(20))
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, tmp_path / "out"))
    assert main(["data-report", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{") + 1 :])
    assert printed["rowsRead"] == 20 and printed["trainRows"] == 18


def _wait_for_complete_checkpoint(proc: subprocess.Popen[str], ckpts: Path) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = sorted(ckpts.glob("checkpoint-*/checkpoint_complete.json"))
        if done:
            return int(done[0].parent.name.split("-")[1])
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before any checkpoint")
        time.sleep(0.02)
    raise AssertionError("no checkpoint within the deadline")


def test_killed_run_resumes_to_the_same_final_step(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", json_task_rows(24))
    training = {"maxSteps": None, "epochs": 2, "batchSize": 2, "checkpointEverySteps": 3}
    expected_steps = 2 * 11  # 22 training rows (2 held out) at batch 2 -> 11 steps per epoch

    def config(name: str) -> tuple[Path, Path]:
        out = tmp_path / name
        cfg = make_config(tiny_model, train, out, training=training)
        return write_config(tmp_path / f"{name}.json", cfg), out

    # Interrupted run: SIGKILL as soon as the first complete checkpoint exists.
    cfg_path, out = config("interrupted")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(cfg_path)],
        cwd=REPO,
        env=held_after_step(subprocess_env(), 6),  # cannot finish before it is killed
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_at = _wait_for_complete_checkpoint(proc, out / "checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists(), "the run finished before it could be killed"
    assert not (out / "checkpoints" / "checkpoint-9").exists(), "the hold did not work"
    assert killed_at < expected_steps
    # A half-written checkpoint (as left by a kill during a save) must be ignored.
    partial = out / "checkpoints" / "checkpoint-999"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"partial")

    # Restart with the same output dir (a new pod of the same Job).
    resumed = _cli(cfg_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert not partial.exists()
    lines = _protocol_lines(resumed.stdout)
    progress = [x for x in lines if x["type"] == "progress"]
    assert progress[0]["step"] > killed_at  # continued, not restarted from step 0
    result = lines[-1]
    assert "resumed from checkpoint-" in (out / "report.md").read_text()

    # The same job run without interruption (in this process: no second interpreter start).
    cfg_path2, _out2 = config("uninterrupted")
    code, ref_lines = _run_main(["train", "--config", str(cfg_path2)], capsys)
    assert code == 0
    reference = ref_lines[-1]

    assert result["steps"] == reference["steps"] == expected_steps
    assert result["data"]["digest"] == reference["data"]["digest"]
    state = json.loads(
        (out / "checkpoints" / f"checkpoint-{expected_steps}" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == expected_steps


def test_make_tiny_model_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_trainer.cli import main

    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (tmp_path / "tiny" / "tokenizer.json").is_file()


@pytest.mark.parametrize("preset", [None, "expandable_segments:False"])
def test_cli_asks_for_expandable_allocator_segments_unless_told_otherwise(
    preset: str | None,
) -> None:
    """Set before torch loads, in the trainer's own process (a user's setting wins)."""
    env = subprocess_env()
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if preset:
        env["PYTORCH_CUDA_ALLOC_CONF"] = preset
    code = (
        "import os, sys; from finetune_trainer import cli; cli._setup(); "
        "assert 'torch' not in sys.modules; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (preset or "expandable_segments:True")
