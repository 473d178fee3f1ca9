"""Checkpoints of an s3:// output, against the same real S3-compatible server (moto, IAM
enforced) as test_s3_output: each complete checkpoint is uploaded (marker last), a new pod
with an empty scratch folder resumes from the newest verified one of its own run, and a
failed checkpoint upload never fails training."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import PROGRESS_PREFIX
from support.s3_server import (
    BUCKET,
    S3Server,
    assert_no_secret,
    cli_result,
    isolated_env,
    object_sizes,
    train_cli,
)
from support.trainer_samples import (
    REPO,
    held_after_step,
    json_task_rows,
    make_config,
    write_config,
    write_jsonl,
)

FP = "sha256:" + "a" * 64
OTHER_FP = "sha256:" + "b" * 64


def _fake_checkpoint(root: Path, step: int, fingerprint: str = FP) -> Path:
    """A checkpoint folder as the trainer leaves it (files, trainer_state.json, marker)."""
    from finetune_trainer.checkpoints import write_marker

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (folder / "optimizer.pt").write_bytes(os.urandom(8192))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    write_marker(folder, fingerprint, step)
    return folder


def _sync(uri: str, tmp: Path, fingerprint: str = FP) -> Any:
    from finetune_trainer.remote_checkpoints import CheckpointSync

    return CheckpointSync(uri, fingerprint, tmp / "staging", "s3-out")


def _upload(uri: str, tmp: Path, steps: list[int], fingerprint: str = FP) -> dict[int, Path]:
    """Upload checkpoints one after another the way the on_save callback does."""
    sync = _sync(uri, tmp, fingerprint)
    local = {}
    for step in steps:
        local[step] = _fake_checkpoint(tmp / f"local-{fingerprint[7]}", step, fingerprint)
        sync.submit(local[step], step)
        sync.wait()
    sync.close()
    assert sync.uploaded == steps and sync.failed == []
    return local


def _remote_steps(s3: S3Server, prefix: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for key in object_sizes(s3, f"{prefix}/checkpoints/"):
        folder, name = key[len(prefix) + len("/checkpoints/") :].split("/", 1)
        found.setdefault(int(folder.split("-")[1]), set()).add(name)
    return found


def test_checkpoints_upload_marker_last_keep_two_and_restore_verified(
    aws_env: S3Server, tmp_path: Path
) -> None:
    from finetune_trainer.remote_checkpoints import restore_latest

    uri = f"s3://{BUCKET}/ckpt/roundtrip"
    aws_env.client().put_object(Bucket=BUCKET, Key="ckpt/roundtrip/notes.txt", Body=b"mine")
    _upload(uri, tmp_path, [9], OTHER_FP)  # another run's checkpoint in the same prefix
    local = _upload(uri, tmp_path, [2, 4, 6])

    remote = _remote_steps(aws_env, "ckpt/roundtrip")
    assert sorted(remote) == [4, 6, 9]  # this run keeps two; the other run's is untouched
    assert remote[6] == {
        "adapter_model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "checkpoint_complete.json",
    }
    assert "ckpt/roundtrip/notes.txt" in object_sizes(aws_env, "ckpt/roundtrip/")
    marker = json.loads(
        aws_env.client()
        .get_object(
            Bucket=BUCKET, Key="ckpt/roundtrip/checkpoints/checkpoint-6/checkpoint_complete.json"
        )["Body"]
        .read()
    )
    assert marker["fingerprint"] == FP and marker["step"] == 6
    assert set(marker["files"]) == {
        "adapter_model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
    }

    # A new pod: empty scratch folder. Step 9 is newer but belongs to another run.
    restored = restore_latest(uri, tmp_path / "pod2" / "checkpoints", FP, "s3-out")
    assert restored == tmp_path / "pod2" / "checkpoints" / "checkpoint-6"
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (restored / name).read_bytes() == (local[6] / name).read_bytes()
    from finetune_trainer.checkpoints import prepare_for_resume

    assert prepare_for_resume(tmp_path / "pod2" / "checkpoints", FP) == restored
    assert sorted(_remote_steps(aws_env, "ckpt/roundtrip")) == [4, 6, 9]  # nothing deleted

    # After a successful final upload this run's checkpoints go, the other run's stay.
    _sync(uri, tmp_path).remove_after_success()
    assert sorted(_remote_steps(aws_env, "ckpt/roundtrip")) == [9]
    assert "ckpt/roundtrip/notes.txt" in object_sizes(aws_env, "ckpt/roundtrip/")


def test_checkpoint_without_marker_is_not_resumed(
    aws_env: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_trainer.remote_checkpoints import restore_latest

    uri = f"s3://{BUCKET}/ckpt/no-marker"
    _upload(uri, tmp_path, [2, 4])
    # checkpoint-4's upload was cut off before its marker.
    aws_env.client().delete_object(
        Bucket=BUCKET, Key="ckpt/no-marker/checkpoints/checkpoint-4/checkpoint_complete.json"
    )
    with caplog.at_level(logging.INFO, logger="finetune_trainer"):
        restored = restore_latest(uri, tmp_path / "pod" / "checkpoints", FP, None)
    assert restored is not None and restored.name == "checkpoint-2"
    assert not (tmp_path / "pod" / "checkpoints" / "checkpoint-4").exists()
    assert "checkpoint-4/ has no completion marker: not resumed" in caplog.text

    # Only a marker-less checkpoint: nothing is resumed.
    aws_env.client().delete_object(
        Bucket=BUCKET, Key="ckpt/no-marker/checkpoints/checkpoint-2/checkpoint_complete.json"
    )
    assert restore_latest(uri, tmp_path / "pod3" / "checkpoints", FP, None) is None
    assert not (tmp_path / "pod3" / "checkpoints").exists()


def test_checkpoint_of_another_run_is_ignored_not_deleted(
    aws_env: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_trainer.remote_checkpoints import restore_latest

    uri = f"s3://{BUCKET}/ckpt/other-run"
    _upload(uri, tmp_path, [3], OTHER_FP)
    with caplog.at_level(logging.INFO, logger="finetune_trainer"):
        assert restore_latest(uri, tmp_path / "pod" / "checkpoints", FP, None) is None
    assert "checkpoint-3/ belongs to another run: ignored" in caplog.text
    assert sorted(_remote_steps(aws_env, "ckpt/other-run")) == [3]
    # Uploads and clean-up of this run leave it alone too.
    _upload(uri, tmp_path, [1, 2, 4])
    _sync(uri, tmp_path).remove_after_success()
    assert sorted(_remote_steps(aws_env, "ckpt/other-run")) == [3]


def test_corrupted_checkpoint_is_detected_and_an_older_one_resumed(
    aws_env: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from finetune_trainer.remote_checkpoints import restore_latest

    uri = f"s3://{BUCKET}/ckpt/corrupt"
    _upload(uri, tmp_path, [2, 4])
    client = aws_env.client()
    key = "ckpt/corrupt/checkpoints/checkpoint-4/adapter_model.safetensors"
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[100] ^= 0xFF  # same size, other bytes, a valid checksum of its own
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body), ChecksumAlgorithm="SHA256")

    with caplog.at_level(logging.WARNING, logger="finetune_trainer"):
        restored = restore_latest(uri, tmp_path / "pod" / "checkpoints", FP, None)
    assert restored is not None and restored.name == "checkpoint-2"
    assert not (tmp_path / "pod" / "checkpoints" / "checkpoint-4").exists()
    assert not (tmp_path / "pod" / "checkpoints-download").exists()
    assert "checkpoint-4/ is not resumed (did not verify:" in caplog.text
    assert "adapter_model.safetensors: sha256 differs" in caplog.text

    # The older one corrupted as well (a missing file): start from scratch.
    client.delete_object(Bucket=BUCKET, Key="ckpt/corrupt/checkpoints/checkpoint-2/optimizer.pt")
    assert restore_latest(uri, tmp_path / "pod2" / "checkpoints", FP, None) is None
    assert "optimizer.pt is missing" in caplog.text


def test_final_upload_leaves_the_checkpoints_prefix_alone(
    aws_env: S3Server, tmp_path: Path
) -> None:
    from finetune_operator.domain.adapter_digest import digest_of_files, hash_directory
    from finetune_trainer.upload import upload_output

    _upload(f"s3://{BUCKET}/ckpt/final", tmp_path, [5])
    adapter = tmp_path / "out" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(1024))
    files = hash_directory(adapter)
    (adapter / "manifest.json").write_text(
        json.dumps({"files": files, "digest": digest_of_files(files)})
    )
    upload_output(f"s3://{BUCKET}/ckpt/final", tmp_path / "out", None)
    assert sorted(_remote_steps(aws_env, "ckpt/final")) == [5]


def test_removal_plan_keeps_other_runs_and_drops_interrupted_uploads() -> None:
    from finetune_trainer.remote_checkpoints import group_by_checkpoint, plan_removals

    root = "p/checkpoints/"
    keys = {
        f"{root}checkpoint-{step}/{name}": 1
        for step, names in {
            2: ["a", "checkpoint_complete.json"],
            4: ["a", "checkpoint_complete.json"],
            5: ["a"],  # upload cut off before its marker
            6: ["a", "checkpoint_complete.json"],
            8: ["a", "checkpoint_complete.json"],
            9: ["a"],
        }.items()
        for name in names
    }
    keys["p/checkpoints/notes.txt"] = 1
    keys["p/checkpoints/checkpoint-x/a"] = 1
    keys["p/adapter/checkpoint-3/a"] = 1
    folders = group_by_checkpoint(keys, root)
    assert sorted(folders) == [2, 4, 5, 6, 8, 9]
    fingerprints: dict[int, str | None] = {2: FP, 4: FP, 6: OTHER_FP, 8: FP}
    assert plan_removals(folders, fingerprints, FP, 2, 8) == [2, 5]
    assert plan_removals(folders, fingerprints, FP, 0, None) == [2, 4, 5, 8, 9]


def test_a_newer_checkpoint_supersedes_one_still_waiting(aws_env: S3Server, tmp_path: Path) -> None:
    uri = f"s3://{BUCKET}/ckpt/burst"
    sync = _sync(uri, tmp_path)
    for step in (1, 2, 3, 4):  # saved faster than they can be sent
        sync.submit(_fake_checkpoint(tmp_path / "local", step), step)
    sync.wait()
    assert sync.uploaded[-1] == 4 and sync.uploaded == sorted(sync.uploaded)
    assert sync.failed == []
    remote = _remote_steps(aws_env, "ckpt/burst")
    assert 4 in remote and len(remote) <= 2
    assert all("checkpoint_complete.json" in names for names in remote.values())
    sync.close()
    assert not (tmp_path / "staging").exists()


# ------------------------------------------------------------------ the real trainer CLI


def _wait_for_remote_checkpoint(proc: subprocess.Popen[str], s3: S3Server, prefix: str) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = [
            k
            for k in object_sizes(s3, f"{prefix}/checkpoints/")
            if k.endswith("/checkpoint_complete.json")
        ]
        if done:
            return min(int(k.split("/checkpoint-")[1].split("/")[0]) for k in done)
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before any checkpoint")
        time.sleep(0.05)
    raise AssertionError("no remote checkpoint within the deadline")


def _progress_steps(stdout: str) -> list[int]:
    lines = [
        json.loads(x[len(PROGRESS_PREFIX) :])
        for x in stdout.splitlines()
        if x.startswith(PROGRESS_PREFIX)
    ]
    return [x["step"] for x in lines if x.get("type") == "progress"]


@pytest.mark.slow
def test_replacement_pod_with_empty_scratch_resumes_from_the_uploaded_checkpoint(
    s3: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    prefix = "runs/preempted"
    train = write_jsonl(tmp_path / "train.jsonl", json_task_rows(24))
    training = {"maxSteps": None, "epochs": 3, "batchSize": 2, "checkpointEverySteps": 3}
    expected_steps = 3 * 11  # 22 training rows (2 held out) at batch 2 -> 11 steps per epoch

    def config(name: str) -> tuple[Path, Path]:
        out = tmp_path / name
        cfg = make_config(
            tiny_model,
            train,
            out,
            training=training,
            output={"uri": f"s3://{BUCKET}/{prefix}", "credentialsSecretRef": {"name": "s3-out"}},
        )
        return write_config(tmp_path / f"{name}.json", cfg), out

    first_cfg, first_out = config("pod-1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finetune_trainer.cli",
            "train",
            "--config",
            str(first_cfg),
            "--no-eval",
        ],
        cwd=REPO,
        # Held after step 6 (checkpoints 3 and 6 saved) so it cannot finish before the kill.
        env=held_after_step(isolated_env(s3.env()), 6),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uploaded_at = _wait_for_remote_checkpoint(proc, s3, prefix)
    proc.send_signal(signal.SIGKILL)  # the pod is evicted; its scratch folder goes with it
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (first_out / "adapter").exists(), "the run finished before it could be killed"
    assert not (first_out / "checkpoints" / "checkpoint-9").exists(), "the hold did not work"
    assert uploaded_at < expected_steps

    # The replacement pod: same job, new empty scratch folder.
    second_cfg, second_out = config("pod-2")
    assert not second_out.exists()
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.cli",
            "train",
            "--config",
            str(second_cfg),
            "--no-eval",
        ],
        cwd=REPO,
        env=isolated_env(s3.env()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "downloaded remote checkpoint" in again.stderr
    resumed_line = next(x for x in again.stderr.splitlines() if "resuming from" in x)
    resumed_at = int(resumed_line.rsplit("checkpoint-", 1)[1])
    assert uploaded_at <= resumed_at < expected_steps
    steps = _progress_steps(again.stdout)
    assert steps and steps[0] == resumed_at + 1  # continued, not restarted from step 0
    result = cli_result(again.stdout)
    assert result["ok"] is True and result["steps"] == expected_steps
    assert f"resumed from checkpoint-{resumed_at}" in (second_out / "report.md").read_text()
    state = json.loads(
        (
            second_out / "checkpoints" / f"checkpoint-{expected_steps}" / "trainer_state.json"
        ).read_text()
    )
    assert state["global_step"] == expected_steps
    # Succeeded: the adapter and report are there, the run's checkpoints are gone.
    keys = object_sizes(s3, f"{prefix}/")
    assert f"{prefix}/adapter/manifest.json" in keys
    assert not [k for k in keys if "/checkpoints/" in k]
    assert_no_secret(s3, again.stdout, again.stderr)


@pytest.mark.slow
def test_checkpoint_upload_failure_does_not_fail_training(
    s3: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    # This user may write the run's output but not under .../checkpoints/ (a real IAM deny).
    env = s3.env(
        AWS_ACCESS_KEY_ID=s3.no_checkpoints_key_id,
        AWS_SECRET_ACCESS_KEY=s3.no_checkpoints_secret,
        AWS_MAX_ATTEMPTS="1",
    )
    proc, out, _cfg = train_cli(
        tmp_path,
        tiny_model,
        f"s3://{BUCKET}/runs/no-checkpoints",
        env,
        "out",
        training={"maxSteps": 4, "checkpointEverySteps": 2},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = cli_result(proc.stdout)
    assert result["ok"] is True and result["steps"] == 4
    assert "checkpoint-2 was not uploaded (training goes on" in proc.stderr
    assert "access denied" in proc.stderr
    keys = object_sizes(s3, "runs/no-checkpoints/")
    assert "runs/no-checkpoints/adapter/manifest.json" in keys
    assert not [k for k in keys if "/checkpoints/" in k]
    assert (out / "checkpoints" / "checkpoint-4" / "checkpoint_complete.json").is_file()
    assert not (out / "checkpoint-upload").exists()  # the staging copies are cleaned up
    assert_no_secret(s3, proc.stdout, proc.stderr)
