"""Checkpoints of an ``s3://`` output kept under ``<prefix>/checkpoints/`` so that a
replacement pod (new, empty scratch folder) resumes where the last one stopped.

Remote layout::

    prefix/checkpoints/checkpoint-<step>/...                     the checkpoint's files
    prefix/checkpoints/checkpoint-<step>/checkpoint_complete.json the marker, sent LAST

The remote marker holds the local marker's fingerprint and step plus the size and sha256 of
every file of the checkpoint. It is sent only after every file landed and verified, and it
is deleted first whenever a checkpoint folder is overwritten or removed, so a folder with a
marker is always whole. A restore downloads the newest remote checkpoint of this run
(fingerprint as in ``checkpoints.py``), checks every file against the marker and resumes
from it; one that does not check out is skipped with a warning, never resumed.

Uploads run on one background thread (rank 0 only): the ``on_save`` callback hard-links the
finished checkpoint into a staging folder (so checkpoint rotation cannot delete files being
sent) and returns. A newer checkpoint replaces one still waiting; the final upload waits
for the thread to finish. A failed checkpoint upload is logged and training goes on
(docs/decisions/1400-checkpoints-synced-to-s3.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .checkpoints import MARKER, STATE_FILE, checkpoint_step
from .s3 import S3Client, S3Location, describe, error_code, make_client, parse_s3_uri
from .upload import PlannedObject, check_landed, delete_keys, list_keys, send_objects

log = logging.getLogger(__name__)

REMOTE_FOLDER = "checkpoints"
# Same retention as the local folder (save_total_limit in train.build_sft_config).
KEEP_REMOTE = 2
_CHUNK = 1 << 20


class CheckpointDidNotVerify(Exception):
    """A remote checkpoint whose files do not match its marker."""


# ------------------------------------------------------------------ keys (pure)


def checkpoints_prefix(location: S3Location) -> str:
    """``<prefix>/checkpoints/``: the only keys this module ever lists, writes or deletes."""
    return location.child(REMOTE_FOLDER) + "/"


def checkpoint_prefix(location: S3Location, step: int) -> str:
    return f"{checkpoints_prefix(location)}checkpoint-{step}/"


def group_by_checkpoint(keys: dict[str, int], root: str) -> dict[int, dict[str, int]]:
    """``{step: {relative path: size}}`` for the keys below ``root`` (``.../checkpoints/``)."""
    folders: dict[int, dict[str, int]] = {}
    for key, size in keys.items():
        if not key.startswith(root):
            continue
        folder, _, rel = key[len(root) :].partition("/")
        step = checkpoint_step(Path(folder))
        if step is None or not rel:
            continue
        folders.setdefault(step, {})[rel] = size
    return folders


def plan_removals(
    folders: dict[int, dict[str, int]],
    fingerprints: dict[int, str | None],
    fingerprint: str,
    keep: int,
    debris_below: int | None,
) -> list[int]:
    """Steps of remote checkpoints to delete.

    This run's complete checkpoints beyond the newest ``keep``, and folders without a
    marker (an interrupted upload) below ``debris_below`` (all of them when it is None).
    Complete checkpoints of other runs are never chosen.
    """
    ours = sorted((s for s, fp in fingerprints.items() if fp == fingerprint), reverse=True)
    remove = ours[keep:]
    for step, rels in folders.items():
        if MARKER not in rels and (debris_below is None or step < debris_below):
            remove.append(step)
    return sorted(remove)


def safe_relative(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


# ------------------------------------------------------------------ local files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {size, sha256}}`` of a checkpoint's files (the marker excluded)."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")
    }


def stage(checkpoint: Path, staging_root: Path) -> Path:
    """A hard-linked (copied where links fail) snapshot of ``checkpoint``: rotation may
    delete the original while it is being sent, and checkpoint files are never rewritten."""
    target = staging_root / checkpoint.name
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint, target, copy_function=link)
    return target


# ------------------------------------------------------------------ remote reads


def _read_marker(client: S3Client, location: S3Location, step: int) -> dict[str, Any] | None:
    key = checkpoint_prefix(location, step) + MARKER
    body = client.get_object(Bucket=location.bucket, Key=key, ChecksumMode="ENABLED")["Body"]
    try:
        data = json.loads(body.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fingerprints(
    client: S3Client, location: S3Location, folders: dict[int, dict[str, int]]
) -> dict[int, str | None]:
    """The fingerprint in each complete remote checkpoint's marker (None: unreadable)."""
    found: dict[int, str | None] = {}
    for step, rels in folders.items():
        if MARKER in rels:
            marker = _read_marker(client, location, step)
            found[step] = str(marker.get("fingerprint")) if marker else None
    return found


def _remote_folders(client: S3Client, location: S3Location) -> dict[int, dict[str, int]]:
    root = checkpoints_prefix(location)
    return group_by_checkpoint(list_keys(client, location.bucket, root), root)


def remove_checkpoints(
    client: S3Client, location: S3Location, folders: dict[int, dict[str, int]], steps: list[int]
) -> None:
    """Delete whole remote checkpoints, each one's marker first (never a marked half)."""
    for step in steps:
        prefix = checkpoint_prefix(location, step)
        rels = folders.get(step, {})
        if MARKER in rels:
            client.delete_object(Bucket=location.bucket, Key=prefix + MARKER)
        rest = [prefix + rel for rel in sorted(rels) if rel != MARKER]
        if rest:
            delete_keys(client, location, rest)
        log.info("removed remote checkpoint %s", f"s3://{location.bucket}/{prefix}")


# ------------------------------------------------------------------ upload


def upload_checkpoint(
    client: S3Client, location: S3Location, staged: Path, fingerprint: str, step: int
) -> int:
    """Send one checkpoint folder, verify it, then its marker; returns the bytes sent."""
    prefix = checkpoint_prefix(location, step)
    marker_key = prefix + MARKER
    files = describe_files(staged)
    if STATE_FILE not in files:
        raise CheckpointDidNotVerify(f"{staged} has no {STATE_FILE}")
    planned = [
        PlannedObject(staged / rel, prefix + rel, int(f["size"])) for rel, f in files.items()
    ]
    before = list_keys(client, location.bucket, prefix)
    if marker_key in before:  # overwriting: the folder must not count as complete meanwhile
        client.delete_object(Bucket=location.bucket, Key=marker_key)
    send_objects(client, location, planned, level=logging.DEBUG)
    stale = sorted(set(before) - {obj.key for obj in planned} - {marker_key})
    if stale:
        delete_keys(client, location, stale)
    problems = check_landed(client, location, planned, owned_prefixes=[prefix])
    if problems:
        raise CheckpointDidNotVerify("; ".join(problems[:3]))
    body = json.dumps({"fingerprint": fingerprint, "step": step, "files": files}).encode()
    client.put_object(Bucket=location.bucket, Key=marker_key, Body=body, ChecksumAlgorithm="SHA256")
    head = client.head_object(Bucket=location.bucket, Key=marker_key)
    if int(head.get("ContentLength", -1)) != len(body):
        raise CheckpointDidNotVerify(f"{marker_key}: marker did not land as sent")
    return sum(obj.size for obj in planned) + len(body)


def prune_remote(client: S3Client, location: S3Location, fingerprint: str, newest: int) -> None:
    """Keep this run's newest KEEP_REMOTE remote checkpoints; drop interrupted uploads below
    ``newest``. Other runs' checkpoints stay."""
    folders = _remote_folders(client, location)
    steps = plan_removals(
        folders, _fingerprints(client, location, folders), fingerprint, KEEP_REMOTE, newest
    )
    remove_checkpoints(client, location, folders, steps)


class CheckpointSync:
    """Uploads finished checkpoints on one background thread; the newest waiting one wins."""

    def __init__(
        self, output_uri: str, fingerprint: str, staging_root: Path, secret: str | None
    ) -> None:
        self.location = parse_s3_uri(output_uri)
        self.fingerprint = fingerprint
        self.staging_root = staging_root
        self.secret = secret
        self.uploaded: list[int] = []
        self.failed: list[int] = []
        self._client: S3Client | None = None
        self._pending: tuple[int, Path] | None = None
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, checkpoint: Path, step: int) -> None:
        """Called in ``on_save`` after the marker: snapshot the folder and hand it over."""
        try:
            staged = stage(checkpoint, self.staging_root)
        except OSError as exc:
            log.warning("checkpoint-%d not uploaded: cannot stage it (%s)", step, exc)
            return
        with self._cond:
            if self._closed:
                shutil.rmtree(staged, ignore_errors=True)
                return
            if self._pending is not None:
                skipped, old = self._pending
                log.info("checkpoint-%d not uploaded: checkpoint-%d supersedes it", skipped, step)
                shutil.rmtree(old, ignore_errors=True)
            self._pending = (step, staged)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="checkpoint-upload", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def wait(self) -> None:
        """Block until nothing is waiting or being sent (before the final upload)."""
        with self._cond:
            if self._busy or self._pending is not None:
                log.info("waiting for the checkpoint upload to finish")
            while self._busy or self._pending is not None:
                self._cond.wait()

    def close(self) -> None:
        self.wait()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        shutil.rmtree(self.staging_root, ignore_errors=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                step, staged = self._pending
                self._pending = None
                self._busy = True
            try:
                self._upload(step, staged)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, step: int, staged: Path) -> None:
        started = time.monotonic()
        try:
            if self._client is None:
                self._client = make_client()
            sent = upload_checkpoint(self._client, self.location, staged, self.fingerprint, step)
        except Exception as exc:  # any failure: training goes on, a restart loses more steps
            self.failed.append(step)
            log.warning(
                "checkpoint-%d was not uploaded (training goes on; a replacement pod would "
                "resume from an older checkpoint): %s",
                step,
                self._problem(exc, "upload to"),
            )
            return
        self.uploaded.append(step)
        log.info(
            "uploaded checkpoint-%d (%d bytes) to %s in %.2f s",
            step,
            sent,
            f"s3://{self.location.bucket}/{checkpoint_prefix(self.location, step)}",
            time.monotonic() - started,
        )
        try:
            prune_remote(self._client, self.location, self.fingerprint, step)
        except Exception as exc:
            log.warning(
                "older remote checkpoints were not removed: %s", self._problem(exc, "clean up")
            )

    def remove_after_success(self) -> None:
        """After the final upload verified: this run's remote checkpoints are no longer needed."""
        self.close()
        try:
            client = self._client or make_client()
            folders = _remote_folders(client, self.location)
            steps = plan_removals(
                folders, _fingerprints(client, self.location, folders), self.fingerprint, 0, None
            )
            remove_checkpoints(client, self.location, folders, steps)
        except Exception as exc:
            log.warning(
                "the run's checkpoints under %s were not removed (remove them by hand): %s",
                f"s3://{self.location.bucket}/{checkpoints_prefix(self.location)}",
                self._problem(exc, "clean up"),
            )

    def _problem(self, exc: BaseException, what: str) -> str:
        if isinstance(exc, CheckpointDidNotVerify):
            return f"did not verify: {exc}"
        return describe(exc, what, self.location, self.secret).message


# ------------------------------------------------------------------ restore


def _download_verified(
    client: S3Client, location: S3Location, step: int, marker: dict[str, Any], target: Path
) -> None:
    """Download the files the marker lists into ``target`` and check each size and sha256."""
    files = marker.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise CheckpointDidNotVerify(f"the marker of checkpoint-{step} lists no files")
    prefix = checkpoint_prefix(location, step)
    for rel, expected in sorted(files.items()):
        if not safe_relative(rel) or not isinstance(expected, dict):
            raise CheckpointDidNotVerify(f"the marker of checkpoint-{step} names {rel!r}")
        local = target / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            client.download_file(location.bucket, prefix + rel, str(local))
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchKey"):
                raise CheckpointDidNotVerify(f"{rel} is missing") from None
            raise
        size = local.stat().st_size
        if size != expected.get("size"):
            raise CheckpointDidNotVerify(f"{rel}: {size} bytes, expected {expected.get('size')}")
        if file_sha256(local) != expected.get("sha256"):
            raise CheckpointDidNotVerify(f"{rel}: sha256 differs from the marker's")
    marker_file = target / MARKER
    marker_file.write_text(
        json.dumps({"fingerprint": marker.get("fingerprint"), "step": step}), encoding="utf-8"
    )


def restore_latest(
    output_uri: str, checkpoint_dir: str | Path, fingerprint: str, secret: str | None
) -> Path | None:
    """Download the newest verified remote checkpoint of this run into ``checkpoint_dir``.

    Returns its local folder, or None (nothing usable remotely, or S3 unreadable: training
    then starts from scratch, with a warning).
    """
    location = parse_s3_uri(output_uri)
    root = Path(checkpoint_dir)
    download = root.parent / (root.name + "-download")
    try:
        client = make_client()
        folders = _remote_folders(client, location)
    except Exception as exc:
        problem = describe(exc, "list checkpoints in", location, secret)
        log.warning(
            "cannot look for remote checkpoints (starting from scratch): %s", problem.message
        )
        return None
    for step in sorted(folders, reverse=True):
        where = f"s3://{location.bucket}/{checkpoint_prefix(location, step)}"
        if MARKER not in folders[step]:
            log.info("remote checkpoint %s has no completion marker: not resumed", where)
            continue
        shutil.rmtree(download, ignore_errors=True)
        try:
            marker = _read_marker(client, location, step)
            if marker is None:
                raise CheckpointDidNotVerify("its marker is not readable JSON")
            if marker.get("fingerprint") != fingerprint:
                log.info("remote checkpoint %s belongs to another run: ignored", where)
                continue
            _download_verified(client, location, step, marker, download)
        except Exception as exc:
            reason = (
                f"did not verify: {exc}"
                if isinstance(exc, CheckpointDidNotVerify)
                else describe(exc, "download from", location, secret).message
            )
            log.warning(
                "remote checkpoint %s is not resumed (%s); trying an older one", where, reason
            )
            shutil.rmtree(download, ignore_errors=True)
            continue
        local = root / f"checkpoint-{step}"
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(local, ignore_errors=True)
        os.replace(download, local)
        log.info("downloaded remote checkpoint %s and verified it", where)
        return local
    return None
