"""The data-source fingerprint a FineTuneSchedule's probe pod reports: metadata only, and it
changes when the data does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from finetune_trainer.fingerprint import FingerprintError, fingerprint, main, s3_entries


def write(path: Path, text: str, mtime: int = 1_700_000_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def test_a_pvc_folder_changes_its_digest_when_a_file_changes_or_appears(tmp_path: Path) -> None:
    write(tmp_path / "datasets" / "support" / "train.jsonl", '{"a": 1}\n')
    write(tmp_path / "datasets" / "support" / "eval.jsonl", '{"b": 2}\n')
    uri = "pvc://datasets/support"
    first = fingerprint(uri, str(tmp_path))
    assert first["files"] == 2 and first["bytes"] == 18
    assert fingerprint(uri, str(tmp_path)) == first  # stable
    write(tmp_path / "datasets" / "support" / "train.jsonl", '{"a": 1}\n', mtime=1_700_000_100)
    touched = fingerprint(uri, str(tmp_path))
    assert touched["digest"] != first["digest"]
    write(tmp_path / "datasets" / "support" / "more.jsonl", "{}\n")
    assert fingerprint(uri, str(tmp_path))["digest"] not in (first["digest"], touched["digest"])
    # Hidden files (editors, sync tools) do not count.
    write(tmp_path / "datasets" / "support" / ".swp", "x")
    assert fingerprint(uri, str(tmp_path))["files"] == 3


def test_a_single_file_and_a_missing_path(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.jsonl", "{}\n")
    assert fingerprint("pvc://d/train.jsonl", str(tmp_path))["files"] == 1
    with pytest.raises(FingerprintError, match="does not exist"):
        fingerprint("pvc://d/nope.jsonl", str(tmp_path))


def test_hf_datasets_need_a_pinned_revision() -> None:
    pinned = fingerprint("hf://datasets/org/name@abc123")
    assert pinned["digest"] != fingerprint("hf://datasets/org/name@def456")["digest"]
    with pytest.raises(FingerprintError, match="pin a revision"):
        fingerprint("hf://datasets/org/name")


@pytest.mark.parametrize(
    ("uri", "says"),
    [("ftp://host/data", "not a supported URI"), ("pvc://d/../etc", "'..' path segments")],
)
def test_unreadable_uris_say_what_to_write(uri: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(FingerprintError, match=says):
        fingerprint(uri, str(tmp_path))


def test_s3_objects_are_listed_not_downloaded() -> None:
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ml-data")
        client.put_object(Bucket="ml-data", Key="support/train.jsonl", Body=b'{"a": 1}\n')
        client.put_object(Bucket="ml-data", Key="other/x.jsonl", Body=b"{}\n")
        first = fingerprint("s3://ml-data/support/", s3_client=lambda: client)
        assert first["files"] == 1 and first["bytes"] == 9
        client.put_object(Bucket="ml-data", Key="support/train.jsonl", Body=b'{"a": 2}\n')
        assert fingerprint("s3://ml-data/support/", s3_client=lambda: client) != first
        with pytest.raises(FingerprintError, match="no object under"):
            fingerprint("s3://ml-data/none/", s3_client=lambda: client)


# Recorded fingerprints hash the entry names: "s3://b/p" and "s3://b/p/" name the same object
# differently, and each keeps the digest it had (these digests were recorded before).
@pytest.mark.parametrize(
    ("uri", "name", "digest"),
    [
        (
            "s3://ml-data/support/",
            "train.jsonl",
            "f5492ff8604fabedb18baa61c88d2aca6d18a4c9d7f678194181edb672be4ffe",
        ),
        (
            "s3://ml-data/support",
            "/train.jsonl",
            "a3d1e5a0bdbba40c0911d272cf6dda0c7b137300746ce1b99c1a8cb2c682f0e3",
        ),
        (
            "s3://ml-data",
            "support/train.jsonl",
            "46d20eca4dfe51a9630b2a9e7bbd031c1578feff9f7f6e29dff20aeab44031ee",
        ),
        (
            "s3://ml-data/",
            "support/train.jsonl",
            "46d20eca4dfe51a9630b2a9e7bbd031c1578feff9f7f6e29dff20aeab44031ee",
        ),
    ],
)
def test_s3_entry_names_keep_the_prefix_as_written(uri: str, name: str, digest: str) -> None:
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="ml-data")
        client.put_object(Bucket="ml-data", Key="support/train.jsonl", Body=b"{}\n")
        assert [entry[0] for entry in s3_entries(uri, client)] == [name]
        assert fingerprint(uri, s3_client=lambda: client)["digest"] == f"sha256:{digest}"


def test_the_command_writes_its_result_to_the_termination_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "d" / "train.jsonl", "{}\n")
    log = tmp_path / "termination-log"
    assert (
        main(["--uri", "pvc://d", "--pvc-root", str(tmp_path), "--termination-log", str(log)]) == 0
    )
    result = json.loads(log.read_text())
    assert result["type"] == "fingerprint" and result["digest"].startswith("sha256:")
    assert json.loads(capsys.readouterr().out) == result
    assert (
        main(["--uri", "pvc://gone", "--pvc-root", str(tmp_path), "--termination-log", str(log)])
        == 2
    )
    assert "does not exist" in json.loads(log.read_text())["error"]
