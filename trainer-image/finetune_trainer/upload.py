"""Upload a finished run to its ``s3://`` output and check what landed.

Layout under ``spec.output.uri`` (``s3://bucket/prefix``)::

    prefix/adapter/...        adapter weights, config, tokenizer and manifest.json
    prefix/merged/...         the merged model (only with output.mergeAndUnload)
    prefix/report.md, loss_curve.svg, metrics.json, base_metrics.json, data_report.json
    prefix/checkpoints/...    not this upload's: remote_checkpoints.py (uses the helpers here)

Every object is sent with ``ChecksumAlgorithm=SHA256``, so the S3 service itself rejects a
corrupted body; afterwards each key's size and stored SHA256 are compared with the local
file. ``manifest.json`` is sent after the files it describes. Objects under ``adapter/`` and
``merged/`` that an earlier attempt left and this upload does not have are deleted, so the
folder always verifies against its manifest. Sending the same run again is harmless: the
same keys are overwritten with the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.domain.adapter_digest import MANIFEST_NAME

from .errors import EXIT_CONFIG, EXIT_TRAINING, EXIT_UPLOAD, TrainerError
from .s3 import (
    S3Client,
    S3Location,
    S3Problem,
    describe,
    error_code,
    make_client,
    parse_s3_uri,
)

log = logging.getLogger(__name__)

UPLOAD_FAILED = "UploadFailed"
# Files of the run report kept next to the adapter (the rest of the output folder is scratch:
# checkpoints, the eval rows copied from the dataset).
REPORT_FILES = (
    "report.md",
    "loss_curve.svg",
    "metrics.json",
    "base_metrics.json",
    "data_report.json",
)
# Folders this upload owns entirely under the prefix (stale keys there are removed).
OWNED_FOLDERS = ("adapter", "merged")
# Single PUT below this size; above it, parts of this size (S3 checks each part's SHA256).
PART_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PlannedObject:
    local: Path
    key: str
    size: int


def plan_upload(output_dir: Path, location: S3Location) -> list[PlannedObject]:
    """Which local files go to which keys, in upload order (each manifest after its files)."""
    planned: list[PlannedObject] = []
    for folder in OWNED_FOLDERS:
        root = output_dir / folder
        if not root.is_dir():
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(root).as_posix() == MANIFEST_NAME)
        for path in files:
            rel = f"{folder}/{path.relative_to(root).as_posix()}"
            planned.append(PlannedObject(path, location.child(rel), path.stat().st_size))
    for name in REPORT_FILES:
        path = output_dir / name
        if path.is_file():
            planned.append(PlannedObject(path, location.child(name), path.stat().st_size))
    return planned


def part_size(size: int) -> int:
    """The part size s3transfer uses for ``size`` bytes with our PART_BYTES (<= 10000 parts)."""
    from s3transfer.utils import ChunksizeAdjuster

    return int(ChunksizeAdjuster().adjust_chunksize(PART_BYTES, size))


def expected_checksums(path: Path, size: int) -> tuple[str, str | None]:
    """Base64 SHA256 values S3 may store for ``path``: of the whole body, and, when it goes
    in parts, the checksum of the part checksums (what S3 keeps for multipart uploads)."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    multipart = size >= PART_BYTES
    step = part_size(size) if multipart else size or 1
    with open(path, "rb") as f:
        while block := f.read(step):
            whole.update(block)
            parts.append(hashlib.sha256(block).digest())
    composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
    return base64.b64encode(whole.digest()).decode(), composite if multipart else None


def stored_checksum_matches(stored: str, path: Path, size: int) -> bool:
    """Whether S3's stored SHA256 (whole body, or ``<composite>-<parts>``) fits ``path``."""
    return stored.split("-")[0] in expected_checksums(path, size)


def list_keys(client: S3Client, bucket: str, prefix: str) -> dict[str, int]:
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            keys[str(obj["Key"])] = int(obj.get("Size", 0))
    return keys


def _owned_prefixes(location: S3Location) -> list[str]:
    return [location.child(folder) + "/" for folder in OWNED_FOLDERS]


def send_objects(
    client: S3Client, location: S3Location, planned: list[PlannedObject], level: int = logging.INFO
) -> None:
    """Upload each planned file in order, with a SHA256 the service checks the body against."""
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES)
    for obj in planned:
        log.log(
            level,
            "uploading %s -> s3://%s/%s (%d bytes)",
            obj.local,
            location.bucket,
            obj.key,
            obj.size,
        )
        client.upload_file(
            str(obj.local),
            location.bucket,
            obj.key,
            ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            Config=transfer,
        )


def delete_keys(client: S3Client, location: S3Location, stale: list[str]) -> None:
    """Delete ``stale`` keys in batches; raises ``S3Problem`` when the service refuses any."""
    for start in range(0, len(stale), 1000):
        batch = stale[start : start + 1000]
        answer = client.delete_objects(
            Bucket=location.bucket,
            Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
        )
        errors = answer.get("Errors") or []
        if errors:
            first = errors[0]
            raise S3Problem(
                f"could not remove {len(errors)} stale object(s) left by an earlier attempt under "
                f"{location.uri} (first: {first.get('Key')}: {first.get('Code')}); remove them or "
                "grant s3:DeleteObject",
                permanent=str(first.get("Code")) == "AccessDenied",
            )
        log.info("removed %d stale object(s) of an earlier attempt", len(batch))


def check_landed(
    client: S3Client,
    location: S3Location,
    planned: list[PlannedObject],
    owned_prefixes: list[str] | None = None,
) -> list[str]:
    """Problems with what the bucket now holds (empty when every object is as sent).

    Keys under ``owned_prefixes`` (default: adapter/ and merged/) that were not sent count
    as problems too.
    """
    problems: list[str] = []
    present: dict[str, int] = {}
    for prefix in owned_prefixes if owned_prefixes is not None else _owned_prefixes(location):
        present.update(list_keys(client, location.bucket, prefix))
    wanted = {obj.key for obj in planned}
    for key in sorted(k for k in present if k not in wanted):
        problems.append(f"s3://{location.bucket}/{key}: not part of this upload")
    for obj in planned:
        try:
            head = client.head_object(Bucket=location.bucket, Key=obj.key, ChecksumMode="ENABLED")
        except Exception as exc:
            if error_code(exc) not in ("404", "NoSuchKey"):
                raise
            problems.append(f"s3://{location.bucket}/{obj.key}: missing after the upload")
            continue
        size = int(head.get("ContentLength", -1))
        if size != obj.size:
            problems.append(f"s3://{location.bucket}/{obj.key}: {size} bytes, sent {obj.size}")
            continue
        stored = head.get("ChecksumSHA256")
        if stored is None:
            continue  # a service that keeps no checksums: the size check is all there is
        if not stored_checksum_matches(str(stored), obj.local, obj.size):
            problems.append(
                f"s3://{location.bucket}/{obj.key}: stored SHA256 differs from the file"
            )
    return problems


def upload_output(output_uri: str, output_dir: str | Path, secret: str | None) -> dict[str, Any]:
    """Upload the run in ``output_dir`` to ``output_uri``; returns what was sent.

    Raises ``TrainerError`` (reason ``UploadFailed``) when anything did not land as sent.
    """
    location = parse_s3_uri(output_uri)
    out = Path(output_dir)
    planned = plan_upload(out, location)
    if not any(obj.key.endswith(f"adapter/{MANIFEST_NAME}") for obj in planned):
        raise TrainerError(
            UPLOAD_FAILED, f"{out}/adapter has no manifest: nothing to upload", EXIT_TRAINING
        )
    try:
        client = make_client()
        before: dict[str, int] = {}
        for prefix in _owned_prefixes(location):
            before.update(list_keys(client, location.bucket, prefix))
        send_objects(client, location, planned)
        stale = sorted(set(before) - {obj.key for obj in planned})
        if stale:
            delete_keys(client, location, stale)
        problems = check_landed(client, location, planned)
    except Exception as exc:
        problem = describe(exc, "upload to", location, secret)
        log.warning("upload failed: %s", problem.message)
        raise TrainerError(
            UPLOAD_FAILED, problem.message, EXIT_CONFIG if problem.permanent else EXIT_UPLOAD
        ) from None
    if problems:
        raise TrainerError(
            UPLOAD_FAILED,
            f"upload to {location.uri} did not verify: {'; '.join(problems[:3])}",
            EXIT_UPLOAD,
        )
    total = sum(obj.size for obj in planned)
    log.info(
        "uploaded %d objects (%d bytes) to %s and verified them", len(planned), total, location.uri
    )
    return {"uri": location.uri, "objects": len(planned), "bytes": total}
