"""Storage URIs: one parse for the operator and the trainer image, checked case by case."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import finetune_operator
import pytest
from finetune_operator.api.adapterdeployment import ADAPTER_URI_PATTERN
from finetune_operator.api.finetunejob import (
    DATA_URI_PATTERN,
    MODEL_URI_PATTERN,
    OUTPUT_URI_PATTERN,
    check_uri,
)
from finetune_operator.domain.uris import StorageUri, UriError, split_scheme

PARSED = [
    ("pvc://models", StorageUri("pvc", "models")),
    ("pvc://models/llama/3", StorageUri("pvc", "models", "llama/3")),
    ("s3://corp-data", StorageUri("s3", "corp-data")),
    ("s3://corp-data/support/train.jsonl", StorageUri("s3", "corp-data", "support/train.jsonl")),
    ("hf://acme/support", StorageUri("hf", "acme/support")),
    ("hf://acme/support@v2", StorageUri("hf", "acme/support", revision="v2")),
    ("hf://acme/support@v2/sub/dir", StorageUri("hf", "acme/support", "sub/dir", revision="v2")),
    ("hf://acme/support/sub", StorageUri("hf", "acme/support", "sub")),
    ("hf://datasets/acme/chat", StorageUri("hf", "acme/chat", dataset=True)),
    (
        "hf://datasets/acme/chat@v1/data/train.jsonl",
        StorageUri("hf", "acme/chat", "data/train.jsonl", revision="v1", dataset=True),
    ),
    ("file:///data/train.jsonl", StorageUri("file", "", "/data/train.jsonl")),
    ("file:///", StorageUri("file", "", "/")),
]


@pytest.mark.parametrize(("uri", "expected"), PARSED)
def test_parse_splits_each_scheme(uri: str, expected: StorageUri) -> None:
    assert StorageUri.parse(uri) == expected


@pytest.mark.parametrize(("uri", "expected"), PARSED)
def test_canonical_uris_round_trip(uri: str, expected: StorageUri) -> None:
    assert str(expected) == uri
    assert StorageUri.parse(str(expected)) == expected


@pytest.mark.parametrize(
    ("uri", "canonical"),
    [
        ("pvc://models/", "pvc://models"),
        ("pvc://models//llama/", "pvc://models/llama"),
        ("s3://corp-data/runs/", "s3://corp-data/runs"),
        ("hf://acme/support@v2/", "hf://acme/support@v2"),
        ("file:///data/dir/", "file:///data/dir/"),  # file paths are kept as written
    ],
)
def test_surplus_slashes_are_dropped_from_the_inner_path(uri: str, canonical: str) -> None:
    assert str(StorageUri.parse(uri)) == canonical


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("ftp://host/file", "use pvc://CLAIM/PATH"),
        ("/data/train.jsonl", "file:///PATH"),
        ("pvc://Models/x", "pvc://CLAIM/PATH with CLAIM a PersistentVolumeClaim name"),
        ("pvc://", "pvc://CLAIM/PATH"),
        ("pvc://models/a b", "pvc://CLAIM/PATH"),
        ("s3://ab/x", "s3://BUCKET/PATH with BUCKET an S3 bucket name"),
        ("s3://Corp/x", "S3 bucket name"),
        ("hf://just-a-name", "hf://ORG/NAME[@REVISION][/PATH]"),
        ("hf://org/name/sub@rev", "hf://ORG/NAME"),
        ("file://relative/path", "file:///PATH with an absolute PATH"),
        ("pvc://models/../etc", "must not contain '..' path segments"),
        ("hf://org/../etc", "must not contain '..' path segments"),
    ],
)
def test_bad_uris_say_which_form_to_use(uri: str, says: str) -> None:
    with pytest.raises(UriError) as err:
        StorageUri.parse(uri)
    assert says in str(err.value)
    assert str(err.value).startswith(f"{uri}: ")


@pytest.mark.parametrize(
    "uri",
    [
        "hf://meta-llama/Meta-Llama-3-8B@refs/pr/1",
        "hf://org/name@main",
        "hf://datasets/org/name@v1/a/b.parquet",
        "pvc://a",
        "pvc://a-b/c/d/",
        "s3://a.b-c/key/with.dots/",
        "file:///x",
    ],
)
def test_everything_the_crd_patterns_accept_parses(uri: str) -> None:
    """The server's side of the grammar must never admit a URI the operator cannot read."""
    patterns = (MODEL_URI_PATTERN, DATA_URI_PATTERN, OUTPUT_URI_PATTERN, ADAPTER_URI_PATTERN)
    assert any(re.fullmatch(p, uri) for p in patterns)
    check_uri(uri)
    parsed = StorageUri.parse(uri)
    assert StorageUri.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("uri", "dest", "path"),
    [
        ("hf://org/name@main", "/in/model", "/in/model"),
        ("hf://org/name@main/sub/dir", "/in/model", "/in/model/sub/dir"),
        ("hf://datasets/org/data@v1/train.jsonl", "/in/train", "/in/train/train.jsonl"),
        ("s3://bucket/runs/adapter", "/in/a", "/in/a"),
        ("s3://bucket/data/train.jsonl", "/in/t", "/in/t/train.jsonl"),
        ("s3://bucket", "/in/t", "/in/t"),
    ],
)
def test_fetched_path_is_where_the_fetch_leaves_the_files(uri: str, dest: str, path: str) -> None:
    assert StorageUri.parse(uri).fetched_path(dest) == path


def test_a_pvc_uri_lives_under_its_claims_mount() -> None:
    assert StorageUri.parse("pvc://models/llama/").under("/mnt/pvc") == "/mnt/pvc/models/llama"
    assert StorageUri.parse("pvc://models").under("/mnt/pvc") == "/mnt/pvc/models"


def test_scheme_specific_parts_refuse_other_schemes() -> None:
    s3 = StorageUri.parse("s3://corp-data/x")
    assert s3.bucket == "corp-data" and s3.fetched
    with pytest.raises(ValueError, match="not a pvc:// URI"):
        _ = s3.claim
    hf = StorageUri.parse("hf://datasets/acme/chat")
    assert (hf.repo, hf.repo_type) == ("acme/chat", "dataset")
    assert StorageUri.parse("hf://acme/m").repo_type == "model"
    assert not StorageUri.parse("pvc://c/x").fetched


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://org/name", ("hf", "org/name")),
        ("file:///x", ("file", "/x")),
        ("/models/Llama-3-8B", (None, "/models/Llama-3-8B")),
        ("gs://bucket/x", (None, "gs://bucket/x")),
    ],
)
def test_split_scheme(text: str, expected: tuple[str | None, str]) -> None:
    assert split_scheme(text) == expected


def test_the_module_imports_without_kopf_or_pydantic() -> None:
    """The trainer image imports it: it must stay standard library only."""
    code = (
        "import sys, finetune_operator.domain.uris; "
        "bad = [m for m in ('kopf', 'pydantic', 'kubernetes', 'yaml') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    operator_dir = Path(finetune_operator.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(operator_dir)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
