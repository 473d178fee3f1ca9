"""Run the real kopf operator in-process against the embedded API server.

The operator gets its own thread and event loop: kopf's shutdown cancels every task of
the loop it runs in, and handlers may call the (blocking) official `kubernetes` client,
which must not freeze the loop that serves the API. Both kopf (through a login handler)
and `kubernetes.client` (through `client_configuration`) are pointed at the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import threading
import types
import weakref
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
import kubernetes.client

from .emulator import Emulator, RunningServer

logger = logging.getLogger(__name__)

# What the current operator run logs in with; each run sets it in its own thread before
# kopf spawns its tasks, so the tasks inherit it (parallel runs can differ).
_CONNECTION: contextvars.ContextVar[kopf.ConnectionInfo | None] = contextvars.ContextVar(
    "operator_run_connection", default=None
)
_EQUIPPED_REGISTRIES: weakref.WeakSet[kopf.OperatorRegistry] = weakref.WeakSet()
_LOGIN_PRIORITY = 1_000_000  # wins over any other credentials an operator module registers
_identities = itertools.count(1)


def _login_to_emulated_api(**_: Any) -> kopf.ConnectionInfo | None:
    # None when not running under run_operator: the module's own login handlers work then.
    return _CONNECTION.get()


def _emulated_api_connection(url: str) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(
        server=url, insecure=True, default_namespace="default", priority=_LOGIN_PRIORITY
    )


def _equip(registry: kopf.OperatorRegistry) -> None:
    if registry not in _EQUIPPED_REGISTRIES:
        kopf.on.login(registry=registry, id="login_to_emulated_api")(_login_to_emulated_api)
        _EQUIPPED_REGISTRIES.add(registry)


def client_configuration(server_url: str) -> kubernetes.client.Configuration:
    """A configuration for the official `kubernetes` client that reaches the given API server."""
    configuration = kubernetes.client.Configuration()
    configuration.host = server_url.rstrip("/")
    configuration.verify_ssl = False
    configuration.api_key = {}
    return configuration


def test_settings(*, peering: bool = False) -> kopf.OperatorSettings:
    """kopf settings for tests: short timeouts, fast retries, no namespace/CRD scanning."""
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 30
    settings.watching.client_timeout = 45
    settings.watching.connect_timeout = 5
    settings.watching.reconnect_backoff = 0.05
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 5
    settings.networking.error_backoffs = [0.05, 0.1, 0.2, 0.5, 1.0]
    settings.execution.default_backoff = 0.5
    settings.queueing.error_delays = [0.1, 0.2, 0.5, 1, 2]
    settings.queueing.exit_timeout = 2
    settings.queueing.idle_timeout = 2
    settings.scanning.disabled = True
    settings.background.cancellation_polling = 1
    settings.process.ultimate_exiting_timeout = 15
    settings.posting.level = logging.INFO
    settings.peering.standalone = not peering
    if peering:
        settings.peering.lifetime = 10
    return settings


@dataclass
class OperatorRun:
    """A running operator; stop it (or leave the `run_operator` block) to shut it down."""

    identity: str
    server_url: str
    settings: kopf.OperatorSettings
    memo: kopf.Memo
    _thread: threading.Thread | None = None
    _stop_flag: threading.Event = field(default_factory=threading.Event)
    _ready_flag: threading.Event = field(default_factory=threading.Event)
    _finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 20.0) -> None:
        """Ask kopf to stop gracefully, wait for its thread, and re-raise a crash."""
        self._stop_flag.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the operator {self.identity} did not stop within {timeout}s")
            # kopf's executor for synchronous handlers outlives the event loop otherwise.
            self.settings.execution.executor.shutdown(wait=True, cancel_futures=True)
        if self.error is not None:
            raise RuntimeError(f"the operator {self.identity} crashed") from self.error


_REGISTRY_PARTS = ("_activities", "_indexing", "_watching", "_spawning", "_changing", "_webhooks")
_module_registries: dict[tuple[str, ...], kopf.OperatorRegistry] = {}


def module_registry(*modules: types.ModuleType) -> kopf.OperatorRegistry:
    """A registry with only the handlers these modules registered in kopf's default registry.

    Several operator modules imported into one process (a whole test suite) all register in
    the default registry; a run for some modules must not also run the others' handlers.
    """
    key = tuple(sorted(m.__name__ for m in modules))
    if key not in _module_registries:
        source, registry = kopf.get_default_registry(), kopf.OperatorRegistry()
        for part in _REGISTRY_PARTS:
            for handler in getattr(source, part).get_all_handlers():
                if getattr(handler.fn, "__module__", None) in key:
                    getattr(registry, part).append(handler)
        _module_registries[key] = registry
    return _module_registries[key]


def _resolve_registry(
    module_or_registry: types.ModuleType | kopf.OperatorRegistry | None,
) -> kopf.OperatorRegistry:
    if isinstance(module_or_registry, kopf.OperatorRegistry):
        return module_or_registry
    if isinstance(module_or_registry, types.ModuleType):
        return module_registry(module_or_registry)
    # No module named: every handler imported so far (kopf's default registry).
    return kopf.get_default_registry()


@contextlib.contextmanager
def run_operator(
    server: Emulator | RunningServer | str,
    module_or_registry: types.ModuleType | kopf.OperatorRegistry | None = None,
    *,
    namespaces: Collection[str] = ("default",),
    clusterwide: bool = False,
    settings: kopf.OperatorSettings | None = None,
    peering: str | None = None,
    priority: int = 0,
    identity: str | None = None,
    memo: kopf.Memo | None = None,
    configure_kubernetes_client: bool = True,
    connection: kopf.ConnectionInfo | None = None,
    startup_timeout: float = 20.0,
    stop_timeout: float = 20.0,
) -> Iterator[OperatorRun]:
    """Run the kopf operator (its registry, or an imported module's handlers) until the block ends.

    `peering` names a (Cluster)KopfPeering object to coordinate through; without it the
    operator runs standalone. `configure_kubernetes_client` makes the server the default
    for `kubernetes.client` while the operator runs (restored afterwards). `connection`
    replaces the anonymous login to `server` (a real cluster: its CA and a token).
    """
    url = server if isinstance(server, str) else str(server.url).rstrip("/")
    login = (
        dataclasses.replace(connection, priority=_LOGIN_PRIORITY)
        if connection is not None
        else _emulated_api_connection(url)
    )
    registry = _resolve_registry(module_or_registry)
    _equip(registry)
    run = OperatorRun(
        identity=identity or f"test-operator-{next(_identities)}",
        server_url=url,
        settings=settings or test_settings(peering=peering is not None),
        memo=memo or kopf.Memo(),
    )

    def main() -> None:
        _CONNECTION.set(login)
        try:
            asyncio.run(
                kopf.operator(
                    registry=registry,
                    settings=run.settings,
                    namespaces=() if clusterwide else list(namespaces),
                    clusterwide=clusterwide,
                    standalone=peering is None,
                    peering_name=peering,
                    priority=priority,
                    identity=cast(Any, run.identity),  # kopf types it as a NewType of str
                    stop_flag=run._stop_flag,
                    ready_flag=run._ready_flag,
                    memo=run.memo,
                )
            )
        except BaseException as exc:
            run.error = exc
            logger.exception("the operator %s crashed", run.identity)
        finally:
            run._finished.set()

    previous_default = kubernetes.client.Configuration._default
    if configure_kubernetes_client:
        kubernetes.client.Configuration.set_default(client_configuration(url))
    run._thread = threading.Thread(
        target=contextvars.Context().run, args=(main,), name=run.identity, daemon=True
    )
    run._thread.start()
    try:
        _wait_ready(run, startup_timeout)
        yield run
    finally:
        try:
            run.stop(stop_timeout)
        finally:
            if configure_kubernetes_client:
                kubernetes.client.Configuration._default = previous_default


def _wait_ready(run: OperatorRun, timeout: float) -> None:
    waited = 0.0
    while waited < timeout:
        if run._ready_flag.wait(0.05):
            return
        if run._finished.is_set():
            raise RuntimeError(f"the operator {run.identity} exited during startup") from run.error
        waited += 0.05
    run._stop_flag.set()
    raise RuntimeError(f"the operator {run.identity} was not ready within {timeout}s")


@contextlib.asynccontextmanager
async def run_operator_async(
    server: Emulator | RunningServer | str,
    module_or_registry: types.ModuleType | kopf.OperatorRegistry | None = None,
    **options: Any,
) -> AsyncIterator[OperatorRun]:
    """`run_operator` for async code: waiting for start and stop does not block the caller's loop."""
    manager = run_operator(server, module_or_registry, **options)
    run = await asyncio.to_thread(manager.__enter__)
    try:
        yield run
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
