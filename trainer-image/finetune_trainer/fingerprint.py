"""``python -m finetune_trainer.fingerprint --uri URI``: a digest of a data source's metadata.

Run in a short-lived pod by a FineTuneSchedule with ``trigger.onDataChange`` to tell whether its
training data changed, without reading the data (decision 1802): a mounted folder or file
(``pvc://`` claims under ``--pvc-root``, ``file:///``) is fingerprinted by each file's relative
path, size and modification time; an ``s3://`` prefix by each object's key, size and ETag (a
listing, no download); an ``hf://`` dataset pinned to a revision by its URI. The result is one
JSON object on stdout and in the termination message:
``{"type": "fingerprint", "digest": "sha256:...", "files": N, "bytes": B}``, or
``{"type": "fingerprint", "error": "..."}`` with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.domain.uris import StorageUri, UriError

if TYPE_CHECKING:
    from .s3 import S3Client

TERMINATION_LOG = "/dev/termination-log"
# A listing larger than this is refused: a prefix that names a whole bucket is a mistake.
MAX_ENTRIES = 1_000_000


class FingerprintError(Exception):
    """The source cannot be fingerprinted; the message says what to change."""


Entry = tuple[str, int, str]  # (relative name, size in bytes, version: mtime or ETag)


def local_entries(path: Path) -> Iterator[Entry]:
    """Each file under ``path`` (or the file itself), sorted by relative name."""
    if path.is_file():
        st = path.stat()
        yield (path.name, st.st_size, str(st.st_mtime_ns))
        return
    if not path.is_dir():
        raise FingerprintError(f"{path} does not exist: check the dataset URI")
    found: list[Entry] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = Path(root) / name
            st = full.stat()
            found.append((str(full.relative_to(path)), st.st_size, str(st.st_mtime_ns)))
            if len(found) > MAX_ENTRIES:
                raise FingerprintError(f"more than {MAX_ENTRIES} files under {path}")
    yield from sorted(found)


def s3_entries(uri: str, client: S3Client) -> Iterator[Entry]:
    """Each object under an ``s3://bucket/prefix`` (a listing: nothing is downloaded)."""
    bucket = StorageUri.parse(uri).bucket
    # Everything after the bucket's "/" as written (not StorageUri.path, which drops leading
    # and trailing "/"): the entry names, and so the digests recorded so far, depend on it.
    prefix = uri[len(f"s3://{bucket}/") :]
    paginator = client.get_paginator("list_objects_v2")
    found: list[Entry] = []
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents") or []:
            key = str(obj["Key"])
            found.append(
                (key[len(prefix) :] or key, int(obj.get("Size") or 0), str(obj.get("ETag")))
            )
            if len(found) > MAX_ENTRIES:
                raise FingerprintError(f"more than {MAX_ENTRIES} objects under {uri}")
    if not found:
        raise FingerprintError(f"no object under {uri}: check the dataset URI")
    yield from sorted(found)


def _default_s3_client() -> S3Client:
    from .s3 import S3Problem, make_client

    try:
        return make_client()
    except S3Problem as exc:
        raise FingerprintError(str(exc)) from exc


def fingerprint(
    uri: str, pvc_root: str = "/mnt/pvc", s3_client: Callable[[], S3Client] = _default_s3_client
) -> dict[str, Any]:
    """The fingerprint of one data source (see the module docstring)."""
    try:
        source = StorageUri.parse(uri)
    except UriError as exc:
        raise FingerprintError(str(exc)) from None
    if source.scheme == "hf":
        if source.revision is None:
            raise FingerprintError(
                f"{uri}: pin a revision (hf://datasets/org/name@rev) to detect changes"
            )
        entries: list[Entry] = [(uri, 0, "pinned")]
    elif source.scheme == "s3":
        # The prefix as written (a trailing "/" included): the entry names, and so the
        # digests recorded so far, depend on it.
        entries = list(s3_entries(uri, s3_client()))
    elif source.scheme == "pvc":
        entries = list(local_entries(Path(source.under(pvc_root))))
    else:
        entries = list(local_entries(Path(source.path)))
    h = hashlib.sha256()
    for name, size, version in entries:
        h.update(f"{name}\x1f{size}\x1f{version}\x1e".encode())
    return {
        "type": "fingerprint",
        "digest": "sha256:" + h.hexdigest(),
        "files": len(entries),
        "bytes": sum(size for _, size, _ in entries),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.fingerprint")
    parser.add_argument("--uri", required=True, help="pvc://, s3://, file:/// or hf:// URI")
    parser.add_argument("--pvc-root", default="/mnt/pvc", help="where pvc:// claims are mounted")
    parser.add_argument("--termination-log", default=TERMINATION_LOG)
    args = parser.parse_args(argv)
    try:
        result, code = fingerprint(args.uri, args.pvc_root), 0
    except (FingerprintError, OSError) as exc:
        result, code = {"type": "fingerprint", "error": str(exc)[:1000]}, 2
    text = json.dumps(result, separators=(",", ":"))
    print(text, flush=True)
    with contextlib.suppress(OSError):  # outside Kubernetes
        Path(args.termination_log).write_text(text, encoding="utf-8")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
