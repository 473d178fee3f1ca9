"""CustomResourceDefinition schemas in the embedded API server (pure apart from file reading).

The checks themselves live in `finetune_operator.tools.crdvalidation`, shared with
`python -m finetune_operator.tools.validate`: prune unknown fields, fill defaults, check metadata,
the structural schema and the CEL rules (transition rules on updates). Writes to the
embedded API are not strict: unknown fields are pruned, as the server does for clients that
do not ask for strict field validation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from finetune_operator.tools.crdvalidation import (
    Body,
    Schema,
    ServedVersion,
    prune_and_default,
    to_json_schema,
)
from finetune_operator.tools.crdvalidation import load_crd_file as _served_versions

from .resources import ResourceType

__all__ = ["Schema", "load_crd_file", "make_defaulter", "prune_and_default", "to_json_schema"]

Validator = Callable[[Body, Body | None], list[str]]


def make_defaulter(served: ServedVersion) -> Callable[[Body], Body]:
    return served.default


def make_validator(served: ServedVersion) -> Validator:
    """Every problem of a write (``old`` is the stored object on updates), as `path: message`."""

    def validate(body: Body, old: Body | None = None) -> list[str]:
        return served.errors(body, old)

    return validate


def resource_type(served: ServedVersion) -> ResourceType:
    return ResourceType(
        group=served.group,
        version=served.version,
        plural=served.plural,
        kind=served.kind,
        namespaced=served.namespaced,
        status_subresource=served.status_subresource,
        extra_subresources=("scale",) if served.scale_subresource else (),
        short_names=served.short_names,
        categories=served.categories,
        singular=served.singular,
        unconditional_update=False,
    )


def load_crd_file(path: Path) -> Iterator[tuple[ResourceType, Validator, Callable[[Body], Body]]]:
    """Every served version of every CRD in a YAML file, with its validator and defaulter."""
    for served in _served_versions(path):
        yield resource_type(served), make_validator(served), make_defaulter(served)
