"""Check FineTuneJob / AdapterDeployment / FineTuneSchedule manifests offline, as the API server would.

    python -m finetune_operator.tools.validate [--crds DIR] [--old LIVE.yaml] FILE...

Every finetune.dev object in the files is checked against the CRDs' own structural schema and
CEL rules with strict JSON types (`"16"` is no integer), its metadata against the API
server's rules, and unknown fields are errors (what `kubectl apply` asks for). With `--old`,
an object whose kind and name appear in LIVE.yaml (e.g. `kubectl get ftj NAME -o yaml`) is
checked as an update of it, transition rules included. Exit status: 0 when the server would
accept every object, 1 when it would refuse one, 2 for unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..api.common import GROUP
from .crdvalidation import (
    Body,
    MissingDependency,
    ServedVersion,
    load_crd_dir,
    load_documents,
    served_versions,
)

# Problems listed per object: a hostile manifest can hold thousands.
MAX_PROBLEMS = 20


@dataclass
class Verdict:
    """The server's answer for one object: no problems means it would be accepted."""

    source: str
    name: str
    problems: list[str] = field(default_factory=list)
    update: bool = False


def builtin_crds() -> dict[tuple[str, str], ServedVersion]:
    """The CRDs of this version of the operator, generated from its models."""
    from . import crdgen

    served: dict[tuple[str, str], ServedVersion] = {}
    for crd in crdgen.all_crds():
        for version in served_versions(crd):
            served[(version.api_version, version.kind)] = version
    return served


def _objects(documents: list[object]) -> list[Body]:
    """The objects of a stream; a `kind: List` (as `kubectl get -o yaml` writes) is opened."""
    found: list[Body] = []
    for doc in documents:
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "List"
            and isinstance(doc.get("items"), list)
        ):
            found += _objects(doc["items"])
        elif isinstance(doc, dict):
            found.append(doc)
    return found


def _key(obj: Body) -> tuple[str, str, str]:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return (str(obj.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))


def _find_old(obj: Body, olds: list[Body]) -> Body | None:
    kind, namespace, name = _key(obj)
    for old in olds:
        old_kind, old_namespace, old_name = _key(old)
        if (old_kind, old_name) == (kind, name) and namespace in ("", old_namespace):
            return old
    return None


def check_object(
    obj: Body, crds: dict[tuple[str, str], ServedVersion], old: Body | None = None
) -> list[str] | None:
    """The server's problems with one object; None when it is not one of ours."""
    api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    served = crds.get((api_version, kind))
    if served is None:
        ours = api_version.split("/")[0] == GROUP or kind in {k for _, k in crds}
        if not ours:
            return None
        return [
            f'no matches for kind "{kind}" in version "{api_version}": '
            f"this version serves {', '.join(sorted(f'{a} {k}' for a, k in crds))}"
        ]
    return served.apply_errors(obj, old)


def check_text(
    text: str,
    source: str,
    crds: dict[tuple[str, str], ServedVersion],
    olds: list[Body] | None = None,
) -> list[Verdict]:
    """A verdict for every finetune.dev object in a YAML/JSON stream."""
    verdicts = []
    for obj in _objects(load_documents(text)):
        old = _find_old(obj, olds or [])
        problems = check_object(obj, crds, old)
        if problems is None:
            continue
        kind, _, name = _key(obj)
        verdicts.append(Verdict(source, f"{kind}/{name}", problems, update=old is not None))
    return verdicts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_operator.tools.validate",
        description="Check finetune.dev manifests offline with the CRDs' schema and CEL rules.",
    )
    parser.add_argument("files", nargs="+", help="YAML or JSON manifests ('-' reads stdin)")
    parser.add_argument(
        "--old",
        action="append",
        default=[],
        metavar="LIVE",
        help="the stored objects (kubectl get -o yaml); matching objects are checked as updates",
    )
    parser.add_argument(
        "--crds",
        metavar="DIR",
        help="check against the CRD YAML files in DIR (default: this version's CRDs)",
    )
    return parser


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        crds = load_crd_dir(Path(args.crds)) if args.crds else builtin_crds()
        olds = [obj for path in args.old for obj in _objects(load_documents(_read(path)))]
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MissingDependency as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = False
    for path in args.files:
        try:
            verdicts = check_text(_read(path), path, crds, olds)
        except (OSError, yaml.YAMLError) as exc:
            print(f"{path}: INVALID: cannot read it: {exc}")
            failed = True
            continue
        except MissingDependency as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for verdict in verdicts:
            what = " (update)" if verdict.update else ""
            if verdict.problems:
                failed = True
                print(f"{path}: {verdict.name}{what}: INVALID")
                for line in verdict.problems[:MAX_PROBLEMS]:
                    print(f"  - {line}")
                if len(verdict.problems) > MAX_PROBLEMS:
                    print(f"  ... and {len(verdict.problems) - MAX_PROBLEMS} more")
            else:
                print(f"{path}: {verdict.name}{what}: valid")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
