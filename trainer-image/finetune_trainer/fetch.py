"""``finetune-trainer fetch``: copy a model or dataset from hf:// or s3:// to a local folder.

Runs as an init container of the trainer pod. Credentials come only from the environment
(``HF_TOKEN``; ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``/
``AWS_ENDPOINT_URL``), injected by Kubernetes from the referenced Secret; they are never
printed. Exit codes: 0 ok, 2 bad usage, 3 source not found, 4 source unreachable (retry).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune_operator.domain.uris import StorageUri, UriError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4  # network or service trouble: worth a retry


class FetchError(Exception):
    def __init__(self, message: str, code: int = EXIT_NOT_FOUND) -> None:
        super().__init__(message)
        self.code = code


def parse_uri(uri: str) -> StorageUri:
    """Parse a source URI; raises FetchError (exit 2) for anything but hf:// and s3://."""
    if ".." in uri.split("/"):
        raise FetchError(f"{uri}: '..' path segments are not allowed", EXIT_USAGE)
    try:
        src = StorageUri.parse(uri)
    except UriError:
        src = None
    if src is None or not src.fetched:
        raise FetchError(f"{uri}: only hf:// and s3:// sources are fetched", EXIT_USAGE)
    return src


def fetch_hf(src: StorageUri, dest: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = None
    if src.path:
        patterns = [src.path, f"{src.path}/*", f"{src.path}/**"]
    try:
        snapshot_download(
            repo_id=src.repo,
            repo_type=src.repo_type,
            revision=src.revision,
            local_dir=str(dest),
            allow_patterns=patterns,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise FetchError(
            f"{src.repo_type} {src.repo}@{src.revision or 'main'} not found: {type(exc).__name__}"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        code = EXIT_NOT_FOUND if status in (401, 403, 404) else EXIT_UNREACHABLE
        raise FetchError(f"download of {src.repo} failed: HTTP {status}", code) from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        # Offline mode, DNS or connection failures: nothing was found locally either.
        raise FetchError(
            f"cannot reach the Hugging Face Hub for {src.repo}: {type(exc).__name__}",
            EXIT_UNREACHABLE,
        ) from exc
    return Path(src.fetched_path(str(dest)))


def fetch_s3(src: StorageUri, dest: Path) -> Path:
    from .s3 import S3Location, describe, make_client

    location = S3Location(src.bucket, src.path)
    prefix = src.path
    try:
        client = make_client()
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=src.bucket, Prefix=prefix
        ):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                # "a/adapter" names that object or the folder a/adapter/, not a/adapter-old/.
                if key.endswith("/") or not (
                    not prefix or key == prefix or key.startswith(prefix + "/")
                ):
                    continue
                rel = key[len(prefix) :].lstrip("/") if key != prefix else Path(key).name
                if ".." in rel.split("/"):
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(src.bucket, key, str(target))
                count += 1
    except Exception as exc:
        problem = describe(exc, "download from", location, None)
        raise FetchError(
            problem.message, EXIT_NOT_FOUND if problem.permanent else EXIT_UNREACHABLE
        ) from None
    if count == 0:
        raise FetchError(f"s3://{src.bucket}/{src.path}: no objects found")
    # A key whose last segment has a suffix names one file (the rule the operator's paths use).
    return Path(src.fetched_path(str(dest)))


def fetch(uri: str, dest: Path) -> Path:
    """Fetch ``uri`` into ``dest``; returns the local path of what was fetched."""
    dest.mkdir(parents=True, exist_ok=True)
    src = parse_uri(uri)
    if src.scheme == "hf":
        return fetch_hf(src, dest)
    return fetch_s3(src, dest)


def check_digest(path: Path, digest: str) -> None:
    """Verify a fetched adapter folder against its manifest and the expected digest."""
    from .manifest import verify

    try:
        actual = verify(path)
    except (OSError, ValueError) as exc:
        raise FetchError(f"{path}: not a verifiable adapter: {exc}") from exc
    if actual != digest:
        raise FetchError(f"{path}: digest is {actual}, expected {digest}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-trainer fetch", description=__doc__)
    parser.add_argument(
        "--uri", required=True, help="hf://org/name@rev, hf://datasets/..., s3://bucket/key"
    )
    parser.add_argument("--dest", required=True, type=Path, help="local folder to fill")
    parser.add_argument(
        "--digest", help="sha256:<hex>: the fetched adapter must carry this manifest digest"
    )
    parser.add_argument(
        "--error-file",
        type=Path,
        help="optional input: write a failure's message here and exit 0, so the pod goes on "
        "without it",
    )
    args = parser.parse_args(argv)
    try:
        path = fetch(args.uri, args.dest)
        if args.digest:
            check_digest(path, args.digest)
    except FetchError as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        if args.error_file is not None:
            args.error_file.parent.mkdir(parents=True, exist_ok=True)
            args.error_file.write_text(f"fetch of {args.uri} failed: {exc}"[:1024], "utf-8")
            return EXIT_OK
        return exc.code
    except Exception as exc:
        if args.error_file is None:
            raise
        # An optional input never fails the pod, whatever went wrong fetching it.
        args.error_file.parent.mkdir(parents=True, exist_ok=True)
        args.error_file.write_text(f"fetch of {args.uri} failed: {type(exc).__name__}", "utf-8")
        return EXIT_OK
    print(f"fetch: {args.uri} -> {path}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
