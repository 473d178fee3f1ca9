"""s3:// output against a real S3-compatible server (moto's, on a free local port, with IAM
authentication enforced): the trainer CLI uploads and verifies the adapter and its report,
the fetch step downloads it back and the digest verifies; failures end in a clear
``UploadFailed`` result and never print a credential."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
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
)


@pytest.fixture(scope="module")
def trained(
    s3: S3Server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path, Path]:
    """One real CLI run whose output goes to s3://models/runs/support."""
    tmp = tmp_path_factory.mktemp("s3-run")
    return train_cli(tmp, tiny_model, f"s3://{BUCKET}/runs/support", s3.env(), "out")


@pytest.mark.slow
def test_cli_uploads_adapter_and_report_and_fetch_verifies_them(
    trained: tuple[Any, Path, Path], aws_env: S3Server, tmp_path: Path
) -> None:
    from finetune_trainer.fetch import fetch
    from finetune_trainer.manifest import verify

    proc, out, _cfg = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = cli_result(proc.stdout)
    digest = result["adapter"]["digest"]
    assert result["ok"] is True
    assert result["adapter"]["uri"] == f"s3://{BUCKET}/runs/support/adapter"
    assert f"uploaded to s3://{BUCKET}/runs/support" in result["message"]

    keys = object_sizes(aws_env, "runs/support/")
    local_adapter = sorted(
        p.relative_to(out).as_posix() for p in (out / "adapter").rglob("*") if p.is_file()
    )
    assert "adapter/adapter_model.safetensors" in local_adapter
    expected = {f"runs/support/{rel}" for rel in local_adapter} | {
        f"runs/support/{name}"
        for name in ("report.md", "loss_curve.svg", "metrics.json", "data_report.json")
    }
    assert set(keys) == expected  # no checkpoints, no copy of the eval rows
    for rel in local_adapter:
        assert keys[f"runs/support/{rel}"] == (out / rel).stat().st_size
    # The service holds the SHA256 the trainer sent (it checked the body against it).
    head = aws_env.client().head_object(
        Bucket=BUCKET, Key="runs/support/adapter/adapter_model.safetensors", ChecksumMode="ENABLED"
    )
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(weights).digest()).decode()
    report = aws_env.client().get_object(Bucket=BUCKET, Key="runs/support/report.md")
    assert f"s3://{BUCKET}/runs/support/adapter" in report["Body"].read().decode()

    # What the serving side's fetch step does: download, then check the digest.
    fetched = fetch(result["adapter"]["uri"], tmp_path / "fetched")
    assert verify(fetched) == digest
    init = subprocess.run(
        [
            *(sys.executable, "-m", "finetune_trainer.fetch"),
            *("--uri", result["adapter"]["uri"], "--dest", str(tmp_path / "init")),
            *("--digest", digest),
        ],
        cwd=REPO,
        env=isolated_env(aws_env.env()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    assert verify(tmp_path / "init") == digest

    termination = (out / "termination-log").read_text()
    assert json.loads(termination)["adapter"]["uri"] == result["adapter"]["uri"]
    assert_no_secret(aws_env, proc.stdout, proc.stderr, termination, init.stdout, init.stderr)


@pytest.mark.slow
def test_rerun_uploads_again_without_retraining_and_drops_stale_objects(
    trained: tuple[Any, Path, Path], aws_env: S3Server
) -> None:
    proc, out, cfg = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = cli_result(proc.stdout)
    client = aws_env.client()
    # An earlier attempt left an extra file, and a file of the adapter is damaged.
    client.put_object(Bucket=BUCKET, Key="runs/support/adapter/stale.bin", Body=b"old")
    client.put_object(Bucket=BUCKET, Key="runs/support/adapter/adapter_config.json", Body=b"{}")

    # A restart with the output folder kept: the final checkpoint is resumed (no steps
    # trained) and the upload runs again.
    again = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(cfg), "--no-eval"],
        cwd=REPO,
        env=isolated_env(aws_env.env()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    assert not any(
        json.loads(x[len(PROGRESS_PREFIX) :]).get("type") == "progress"
        and json.loads(x[len(PROGRESS_PREFIX) :]).get("step", 0) < 3
        for x in again.stdout.splitlines()
        if x.startswith(PROGRESS_PREFIX)
    )
    second = cli_result(again.stdout)
    assert second["adapter"]["digest"] == first["adapter"]["digest"]
    keys = object_sizes(aws_env, "runs/support/adapter/")
    assert "runs/support/adapter/stale.bin" not in keys
    assert (
        keys["runs/support/adapter/adapter_config.json"]
        == (out / "adapter" / "adapter_config.json").stat().st_size
    )


# ------------------------------------------------------------------ failures


@pytest.mark.slow
def test_rejected_credentials_fail_the_cli_run_without_printing_them(
    s3: S3Server, tiny_model: Path, tmp_path: Path
) -> None:
    proc, out, _cfg = train_cli(
        tmp_path,
        tiny_model,
        f"s3://{BUCKET}/runs/bad-secret",
        s3.env(AWS_SECRET_ACCESS_KEY="WRONG-SECRET"),
        "out",
        "--verbose",  # debug logging on: the S3 client's own debug lines must still stay off
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # not retried: the Secret needs fixing
    result = cli_result(proc.stdout)
    assert result["ok"] is False and result["reason"] == "UploadFailed"
    assert "SignatureDoesNotMatch" in result["message"]
    assert "Secret s3-out" in result["message"]
    assert "adapter" not in result
    assert object_sizes(s3, "runs/bad-secret/") == {}
    termination = (out / "termination-log").read_text()
    assert json.loads(termination)["reason"] == "UploadFailed"
    assert_no_secret(s3, proc.stdout, proc.stderr, termination)


@pytest.fixture(scope="module")
def finished_output(
    trained: tuple[Any, Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of a finished run's output folder, to upload again in-process."""
    proc, out, _cfg = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    copy = tmp_path_factory.mktemp("finished") / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def _upload_error(uri: str, output: Path) -> Any:
    from finetune_trainer.errors import TrainerError
    from finetune_trainer.upload import upload_output

    with pytest.raises(TrainerError) as caught:
        upload_output(uri, output, "s3-out")
    assert caught.value.reason == "UploadFailed"
    return caught.value


@pytest.mark.slow
def test_missing_bucket_is_a_permanent_failure(aws_env: S3Server, finished_output: Path) -> None:
    err = _upload_error("s3://no-such-bucket/runs/x", finished_output)
    assert err.exit_code == 2
    assert "bucket no-such-bucket does not exist" in err.message


@pytest.mark.slow
def test_access_denied_names_the_permissions_to_grant(
    aws_env: S3Server, finished_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", aws_env.denied_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_env.denied_secret)
    err = _upload_error(f"s3://{BUCKET}/runs/denied", finished_output)
    assert err.exit_code == 2
    assert "access denied" in err.message and "s3:PutObject" in err.message
    assert_no_secret(aws_env, err.message)
    assert object_sizes(aws_env, "runs/denied/") == {}


@pytest.mark.slow
def test_missing_credentials_and_missing_boto3_are_permanent(
    aws_env: S3Server, finished_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = _upload_error(f"s3://{BUCKET}/runs/anon", finished_output)
    assert err.exit_code == 2 and "no S3 credentials found" in err.message
    monkeypatch.setitem(sys.modules, "boto3", None)  # as in an image without it
    err = _upload_error(f"s3://{BUCKET}/runs/anon", finished_output)
    assert err.exit_code == 2 and "boto3 is not installed" in err.message


@pytest.mark.slow
def test_unreachable_endpoint_is_retried_then_reported_as_retryable(
    aws_env: S3Server, finished_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    err = _upload_error(f"s3://{BUCKET}/runs/offline", finished_output)
    assert err.exit_code == 6  # the Job runs the pod again
    assert f"cannot reach http://127.0.0.1:{dead}" in err.message


@pytest.mark.slow
def test_upload_checks_what_landed(aws_env: S3Server, finished_output: Path) -> None:
    from finetune_trainer.s3 import make_client, parse_s3_uri
    from finetune_trainer.upload import check_landed, plan_upload, upload_output

    sent = upload_output(f"s3://{BUCKET}/runs/checked", finished_output, None)
    assert sent["objects"] == len(object_sizes(aws_env, "runs/checked/"))
    location = parse_s3_uri(f"s3://{BUCKET}/runs/checked")
    planned = plan_upload(finished_output, location)
    client = make_client()
    assert check_landed(client, location, planned) == []
    # A changed object (same size, other bytes) and an extra one are both caught.
    weights = next(p for p in planned if p.key.endswith("adapter_model.safetensors"))
    body = bytearray(weights.local.read_bytes())
    body[-1] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=weights.key, Body=bytes(body), ChecksumAlgorithm="SHA256")
    client.put_object(Bucket=BUCKET, Key="runs/checked/adapter/extra.txt", Body=b"x")
    client.delete_object(Bucket=BUCKET, Key="runs/checked/report.md")
    problems = check_landed(client, location, planned)
    assert any("report.md: missing after the upload" in p for p in problems)
    assert any("adapter_model.safetensors: stored SHA256 differs" in p for p in problems)
    assert any("extra.txt: not part of this upload" in p for p in problems)


# ------------------------------------------------------------------ fetch (init containers)


def test_fetch_downloads_files_and_folders_and_reports_failures(
    aws_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_trainer.fetch import EXIT_NOT_FOUND, EXIT_UNREACHABLE, FetchError, fetch

    client = aws_env.client()
    client.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=b'{"a": 1}\n')
    client.put_object(Bucket=BUCKET, Key="data/train.jsonl.bak", Body=b"old")
    client.put_object(Bucket=BUCKET, Key="base/tiny/config.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key="base/tiny/sub/tokenizer.json", Body=b"[]")
    client.put_object(Bucket=BUCKET, Key="base/tiny-old/config.json", Body=b"old")

    one = fetch(f"s3://{BUCKET}/data/train.jsonl", tmp_path / "train")
    assert one == tmp_path / "train" / "train.jsonl"
    assert one.read_bytes() == b'{"a": 1}\n'
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["train.jsonl"]

    folder = fetch(f"s3://{BUCKET}/base/tiny", tmp_path / "model")
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["config.json", "sub/tokenizer.json"]  # not the sibling tiny-old/

    with pytest.raises(FetchError) as missing:
        fetch("s3://no-such-bucket/x", tmp_path / "x")
    assert missing.value.code == EXIT_NOT_FOUND and "does not exist" in str(missing.value)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WRONG-SECRET")
    with pytest.raises(FetchError) as rejected:
        fetch(f"s3://{BUCKET}/data/train.jsonl", tmp_path / "y")
    assert rejected.value.code == EXIT_NOT_FOUND
    assert "rejected the credentials" in str(rejected.value)
    assert_no_secret(aws_env, str(rejected.value))

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(FetchError) as offline:
        fetch(f"s3://{BUCKET}/data/train.jsonl", tmp_path / "z")
    assert offline.value.code == EXIT_UNREACHABLE


def test_multipart_objects_are_checked_against_their_part_checksums(
    aws_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from finetune_operator.domain.adapter_digest import digest_of_files, hash_directory
    from finetune_trainer import upload
    from finetune_trainer.s3 import make_client, parse_s3_uri

    monkeypatch.setattr(upload, "PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part size
    adapter = tmp_path / "out" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(11 * 1024 * 1024))
    files = hash_directory(adapter)
    (adapter / "manifest.json").write_text(
        json.dumps({"files": files, "digest": digest_of_files(files)})
    )
    upload.upload_output(f"s3://{BUCKET}/runs/multipart", tmp_path / "out", None)

    key = "runs/multipart/adapter/adapter_model.safetensors"
    head = aws_env.client().head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    stored = head["ChecksumSHA256"].split("-")[0]
    whole, composite = upload.expected_checksums(adapter / "adapter_model.safetensors", 11 << 20)
    assert stored in (whole, composite) and whole != composite
    location = parse_s3_uri(f"s3://{BUCKET}/runs/multipart")
    planned = upload.plan_upload(tmp_path / "out", location)
    assert upload.check_landed(make_client(), location, planned) == []
