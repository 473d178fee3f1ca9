"""Pytest fixtures for running the real operator against the embedded Kubernetes API.

A pytest plugin: tests/conftest.py registers it, so every test may ask for the fixtures by
name; helpers (`wait_for`, `create`, `get`, ...) are imported from `support.k8s_fixtures`.

`emulator` is a served `finetune_local.Emulator` (the test acts as "the
cluster" through its helpers); `operator_runner(registry_or_module, **kwargs)` starts a
kopf operator against it and stops every operator it started when the test ends.
Options for the emulator come from a marker: `@pytest.mark.emulator(validate_schemas=True)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from finetune_local import Emulator, OperatorRun, run_operator, serve

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"

_current: list[Emulator] = []


@pytest.fixture
def emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    """A fresh embedded API server on 127.0.0.1 (random port), stopped after the test."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("emulator"))):
        options.update(marker.kwargs)
    if options.get("validate_schemas"):
        options.setdefault("crd_dir", CRD_DIR)
    api = Emulator(**options)
    with serve(api):
        _current.append(api)
        try:
            yield api
        finally:
            _current.remove(api)


@pytest.fixture
def operator_runner(emulator: Emulator) -> Iterator[Callable[..., OperatorRun]]:
    """A factory: `operator_runner(registry_or_module, namespaces=[...], ...)` -> a running operator."""
    with contextlib.ExitStack() as stack:

        def start(module_or_registry: Any = None, **kwargs: Any) -> OperatorRun:
            return stack.enter_context(run_operator(emulator, module_or_registry, **kwargs))

        yield start


def current_emulator() -> Emulator:
    if not _current:
        raise RuntimeError("no emulator is running: request the `emulator` fixture")
    return _current[-1]


def _described(what: str | Callable[[], str], predicate: Callable[[], object]) -> str:
    text = what() if callable(what) else what
    return repr(text or predicate)


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
) -> T:
    """Poll until `predicate()` is truthy and return its value; fail with the last value seen.

    `what` names the awaited state; a callable is called only on a timeout, so a message
    that shows an object's status shows it as it was then, not before the wait."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {_described(what, predicate)}; "
                f"last value: {value!r}"
            )
        time.sleep(interval)
        value = predicate()
    return value


async def async_wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
) -> T:
    """`wait_for` for async tests: sleeps without blocking the test's event loop."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {_described(what, predicate)}; "
                f"last value: {value!r}"
            )
        await asyncio.sleep(interval)
        value = predicate()
    return value


def create(obj: dict[str, Any], *, keep_status: bool = False) -> dict[str, Any]:
    """Create an object as a user would (status dropped where it is a subresource)."""
    return current_emulator().create(obj, keep_status=keep_status)


def get(kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The stored object or None; `kind` is a plural, kind or short name."""
    return current_emulator().read(kind, namespace, name)


def patch_status(
    kind: str, namespace: str | None, name: str, status: dict[str, Any]
) -> dict[str, Any]:
    """Merge-patch an object's status as a controller in the cluster would."""
    return current_emulator().patch_status(kind, namespace, name, status)
