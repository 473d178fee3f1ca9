"""Storage URIs: ``pvc://``, ``s3://``, ``hf://`` and ``file://``, parsed once into one value.

The operator (pod layout, serving placement, local mode) and the trainer image (fetch, S3
upload) read the same URIs; both split them here, so a path the operator expects is the path
the trainer's fetch leaves. Pure standard library: the trainer image imports it too.

The CRDs' patterns and CEL rules (``api/``) are the API server's side of the same grammar;
:meth:`StorageUri.parse` accepts what they accept and says what to change otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["pvc", "s3", "hf", "file"]
SCHEMES: tuple[Scheme, ...] = ("hf", "pvc", "s3", "file")

_PVC = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)(/(?P<path>[^\s]*))?$")
_S3 = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/(?P<key>[^\s]*))?$")
# The revision is the shortest match, so what follows its first "/" is a path in the repo.
_HF = re.compile(
    r"^hf://(?P<datasets>datasets/)?(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+)"
    r"(@(?P<rev>[A-Za-z0-9._/-]+?))?(?P<sub>/[^@\s]*)?$"
)
_FILE = re.compile(r"^file://(?P<path>/[^\s]*)$")

_FORMS = {
    "pvc": "pvc://CLAIM/PATH with CLAIM a PersistentVolumeClaim name (lowercase letters, "
    "digits and '-')",
    "s3": "s3://BUCKET/PATH with BUCKET an S3 bucket name (3 to 63 lowercase letters, "
    "digits, '.' and '-')",
    "hf": "hf://ORG/NAME[@REVISION][/PATH] or hf://datasets/ORG/NAME[@REVISION][/PATH]",
    "file": "file:///PATH with an absolute PATH",
}


class UriError(ValueError):
    """A URI that is not one of the supported forms; the message says which form to use."""


def split_scheme(text: str) -> tuple[Scheme | None, str]:
    """(scheme, rest after ``scheme://``) of a supported scheme, or (None, text) for others."""
    for scheme in SCHEMES:
        prefix = f"{scheme}://"
        if text.startswith(prefix):
            return scheme, text[len(prefix) :]
    return None, text


@dataclass(frozen=True)
class StorageUri:
    """One parsed storage URI.

    ``authority`` is the claim (pvc), bucket (s3) or ``org/name`` repository (hf), and empty
    for file. ``path`` is the part inside it without leading or trailing ``/`` (for file: the
    absolute path as written). ``str()`` gives the canonical form, which parses back to an
    equal value.
    """

    scheme: Scheme
    authority: str
    path: str = ""
    revision: str | None = None  # hf only
    dataset: bool = False  # hf only: hf://datasets/ORG/NAME

    @classmethod
    def parse(cls, uri: str) -> StorageUri:
        """Split ``uri``; raises :class:`UriError` that names the form to use."""
        scheme, _ = split_scheme(uri)
        if scheme is None:
            forms = "; ".join(_FORMS[s] for s in ("pvc", "s3", "hf", "file"))
            raise UriError(f"{uri}: not a supported URI; use {forms}")
        if ".." in uri.split("/"):
            raise UriError(f"{uri}: must not contain '..' path segments")
        parsed = _match(scheme, uri)
        if parsed is None:
            raise UriError(f"{uri}: write it as {_FORMS[scheme]}")
        return parsed

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        head = f"{self.scheme}://"
        if self.dataset:
            head += "datasets/"
        head += self.authority
        if self.revision is not None:
            head += f"@{self.revision}"
        return f"{head}/{self.path}" if self.path else head

    @property
    def claim(self) -> str:
        return self._part("pvc")

    @property
    def bucket(self) -> str:
        return self._part("s3")

    @property
    def repo(self) -> str:
        return self._part("hf")

    @property
    def repo_type(self) -> Literal["model", "dataset"]:
        return "dataset" if self.dataset else "model"

    @property
    def fetched(self) -> bool:
        """Whether the files must be downloaded first (s3, hf) rather than mounted or read."""
        return self.scheme in ("s3", "hf")

    def under(self, root: str) -> str:
        """The path of a pvc:// URI when its claim is mounted at ``root/CLAIM``."""
        return f"{root}/{self.claim}/{self.path}".rstrip("/")

    def fetched_path(self, dest: str) -> str:
        """Where a fetch of this s3:// or hf:// URI into ``dest`` leaves what it names.

        hf:// with a path inside the repository: that path; s3:// whose last key segment has
        a suffix: that one file; otherwise the folder itself.
        """
        if self.scheme == "hf":
            return f"{dest}/{self.path}" if self.path else dest
        last = self.path.rsplit("/", 1)[-1]
        return f"{dest}/{last}" if "." in last else dest

    def _part(self, scheme: Scheme) -> str:
        if self.scheme != scheme:
            raise ValueError(f"{self}: not a {scheme}:// URI")
        return self.authority


def _match(scheme: Scheme, uri: str) -> StorageUri | None:
    if scheme == "file":
        m = _FILE.match(uri)
        return StorageUri("file", "", m.group("path")) if m else None
    if scheme == "pvc":
        m = _PVC.match(uri)
        return StorageUri("pvc", m.group("claim"), _inner(m.group("path"))) if m else None
    if scheme == "s3":
        m = _S3.match(uri)
        return StorageUri("s3", m.group("bucket"), _inner(m.group("key"))) if m else None
    m = _HF.match(uri)
    if m is None:
        return None
    return StorageUri(
        "hf",
        m.group("repo"),
        _inner(m.group("sub")),
        revision=m.group("rev"),
        dataset=bool(m.group("datasets")),
    )


def _inner(path: str | None) -> str:
    return (path or "").strip("/")
