"""The only code that talks to the Kubernetes API.

Credentials come from the official ``kubernetes`` package, which knows where to find them
(in-cluster ServiceAccount or kubeconfig, exec plugins and token refresh included). Requests
go out over one pooled ``aiohttp`` session per event loop, carrying plain dicts: builders and
planners work on dicts, and round-tripping through the generated models would drop fields
the models do not know (custom resources, newer Job fields). The ``kubernetes`` client's own
calls block, and running them in worker threads cost the operator more CPU than its
reconciles did (decision 1204).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import aiohttp

from ..api.adapterdeployment import PLURAL as AD_PLURAL
from ..api.common import GROUP, VERSION
from ..api.finetunejob import PLURAL as FTJ_PLURAL
from ..api.finetuneschedule import PLURAL as FTS_PLURAL
from ..builders.names import EVENT_SOURCE
from ..domain.times import now_rfc3339

if TYPE_CHECKING:  # at run time the kubernetes package is imported where credentials load
    from kubernetes.client import ApiClient, Configuration

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
JSON = "application/json"
# Ask for metadata only: existence checks of Secrets never carry their data over the wire.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
# Requests in flight at once to the API server (one pooled connection each).
MAX_CONNECTIONS = 16
# How long the credentials' header is reused before the configuration is asked again (it
# refreshes expiring tokens then; a 401 asks at once). Asking on every request re-read the
# kubeconfig's settings each time: a twentieth of the operator's CPU under load.
AUTH_HEADER_TTL_SECONDS = 10.0
# No API call of the operator may hang a reconcile: list and log reads included, this is ample.
REQUEST_TIMEOUT_SECONDS = 60.0


class KubeError(Exception):
    """A failed API call, with its HTTP status and the server's message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """A write lost a race (409) or a precondition failed (422 from a patch test)."""
        return self.status in (409, 422)


def collection_path(kind: str, namespace: str) -> str:
    """The API path of a namespaced collection of ``kind`` (or of Namespaces themselves)."""
    paths = {
        "Namespace": "/api/v1/namespaces",
        "Job": f"/apis/batch/v1/namespaces/{namespace}/jobs",
        "Deployment": f"/apis/apps/v1/namespaces/{namespace}/deployments",
        "ConfigMap": f"/api/v1/namespaces/{namespace}/configmaps",
        "Pod": f"/api/v1/namespaces/{namespace}/pods",
        "Secret": f"/api/v1/namespaces/{namespace}/secrets",
        "Service": f"/api/v1/namespaces/{namespace}/services",
        "PersistentVolumeClaim": f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        "Event": f"/api/v1/namespaces/{namespace}/events",
        "FineTuneJob": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{FTJ_PLURAL}",
        "AdapterDeployment": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{AD_PLURAL}",
        "FineTuneSchedule": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{FTS_PLURAL}",
    }
    return paths[kind]


def object_path(kind: str, namespace: str, name: str, sub: str = "") -> str:
    """The API path of one object (or its ``sub``resource: status, log)."""
    path = f"{collection_path(kind, namespace)}/{quote(name, safe='')}"
    return f"{path}/{sub}" if sub else path


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def ssl_context(configuration: Configuration) -> ssl.SSLContext | bool:
    """TLS settings of a ``kubernetes.client.Configuration`` for aiohttp's connector
    (True: aiohttp's defaults, which plain HTTP ignores; False: no verification)."""
    if not str(configuration.host).startswith("https://"):
        return True
    if not configuration.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    if configuration.assert_hostname is False:
        context.check_hostname = False
    return context


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} to the API server")


def api_client_from_environment() -> ApiClient:
    """A ``kubernetes.client.ApiClient``: the client's process-wide default when a program
    embedding the operator set one (the embedded API of `finetune-local demo` and the
    tests), else the in-cluster ServiceAccount when running in a pod, else the local
    kubeconfig."""
    from kubernetes import client, config

    # `Configuration.set_default` has no public "is it set?" query; `_default` is it.
    if client.Configuration._default is not None:
        return client.ApiClient()
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubeClient:
    """Async client of the Kubernetes API speaking dicts.

    ``api_client`` is a ``kubernetes.client.ApiClient``: only its configuration (host, TLS,
    token and its refresh) is used. The HTTP session is made on first use in the running
    event loop; :meth:`close` releases it.
    """

    def __init__(self, api_client: ApiClient, max_connections: int = MAX_CONNECTIONS) -> None:
        self._api = api_client
        self._configuration = api_client.configuration
        self._host = str(self._configuration.host).rstrip("/")
        self._ssl = ssl_context(self._configuration)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._auth: tuple[float, dict[str, str]] | None = None  # (monotonic time, headers)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_environment(cls) -> KubeClient:
        return cls(api_client_from_environment())

    @classmethod
    def from_url(cls, url: str, token: str | None = None) -> KubeClient:
        """A client for a plain HTTP(S) endpoint (tests, kubectl proxy)."""
        from kubernetes import client

        configuration = client.Configuration(host=url.rstrip("/"))
        if token:
            configuration.api_key = {"BearerToken": token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return cls(client.ApiClient(configuration))

    # ------------------------------------------------------------ transport

    def _session_here(self) -> aiohttp.ClientSession:
        """The session of the running event loop (a client may outlive one loop: tests)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
                # Never follow a kubeconfig's proxy settings from the environment silently:
                # the configuration's own proxy (below) is the one the user chose.
                trust_env=False,
            )
            self._session_loop = loop
        return self._session

    async def close(self) -> None:
        """Release the HTTP session of the running loop (the operator's cleanup calls it)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            with contextlib.suppress(RuntimeError):  # its loop is already closed
                await session.close()

    def _auth_headers(self, fresh: bool = False) -> dict[str, str]:
        """The credentials' headers; the configuration refreshes expiring tokens (projected
        ServiceAccount tokens, kubeconfig exec plugins) each time it is asked."""
        now = time.monotonic()
        if not fresh and self._auth is not None and now - self._auth[0] < AUTH_HEADER_TTL_SECONDS:
            return self._auth[1]
        headers = {
            str(setting["key"]): str(setting["value"])
            for setting in self._configuration.auth_settings().values()
            if setting.get("in") == "header" and setting.get("value")
        }
        self._auth = (now, headers)
        return headers

    async def _acall(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        content_type: str = JSON,
        raw: bool = False,
        accept: str = "application/json, */*",
    ) -> Any:
        url = self._host + path + ("?" + urlencode(query) if query else "")
        data = None if body is None else json.dumps(body, default=_json_default).encode()
        for fresh_credentials in (False, True):
            headers = {"Accept": accept, "Content-Type": content_type}
            headers.update(self._auth_headers(fresh=fresh_credentials))
            try:
                async with self._session_here().request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    proxy=self._configuration.proxy or None,
                    server_hostname=getattr(self._configuration, "tls_server_name", None) or None,
                ) as response:
                    status = response.status
                    payload = await response.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                # Unreachable or too slow: callers treat it like any failed call (retry later).
                message = f"{method} {path}: {type(exc).__name__}: {exc}"
                raise KubeError(0, message, "Unreachable") from exc
            if status != 401:
                break
        if status >= 400:
            try:
                detail = json.loads(payload)
                message, reason = str(detail.get("message", "")), str(detail.get("reason", ""))
            except (ValueError, AttributeError):
                message, reason = (payload or b"").decode(errors="replace")[:500], ""
            raise KubeError(status, message, reason)
        if raw:
            return (payload or b"").decode(errors="replace")
        return json.loads(payload) if payload else {}

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API request (keyword arguments as ``_acall``); for verbs not offered below."""
        return await self._acall(method, path, **kwargs)

    # ------------------------------------------------------------ generic verbs

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._acall("GET", object_path(kind, namespace, name))
            return result
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    async def exists(self, kind: str, namespace: str, name: str) -> bool:
        """Whether the object exists, asking for its metadata only (Secret data never read)."""
        try:
            await self._acall("GET", object_path(kind, namespace, name), accept=METADATA_ONLY)
            return True
        except KubeError as exc:
            if exc.not_found:
                return False
            raise

    async def list(
        self, kind: str, namespace: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        query = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        )
        result = await self._acall("GET", collection_path(kind, namespace), query=query)
        items = list(result.get("items") or [])
        # Filter here too: not every API server (or emulator) honours labelSelector.
        return [i for i in items if matches_labels(i, labels or {})]

    async def create(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create ``body``; an existing object of that name counts as success.

        Returns the object and whether this call created it.
        """
        meta = body["metadata"]
        try:
            created = await self._acall(
                "POST", collection_path(body["kind"], meta["namespace"]), body=dict(body)
            )
            return created, True
        except KubeError as exc:
            if exc.status != 409:
                raise
        existing = await self.get(body["kind"], meta["namespace"], meta["name"])
        return existing or dict(body), False

    async def patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], sub: str = ""
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._acall(
            "PATCH",
            object_path(kind, namespace, name, sub),
            body=dict(patch),
            content_type=MERGE_PATCH,
        )
        return result

    async def delete(
        self, kind: str, namespace: str, name: str, propagation: str = "Background"
    ) -> bool:
        """Delete; returns False when it was already gone."""
        try:
            await self._acall(
                "DELETE",
                object_path(kind, namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
            return True
        except KubeError as exc:
            if exc.not_found:
                return False
            raise

    # ------------------------------------------------------------ specific reads and writes

    async def read_log(
        self, namespace: str, pod: str, container: str, tail_lines: int
    ) -> str | None:
        """The last ``tail_lines`` lines of a container's log, or None when there is none yet."""
        try:
            text: str = await self._acall(
                "GET",
                object_path("Pod", namespace, pod, "log"),
                query={"container": container, "tailLines": str(tail_lines)},
                raw=True,
            )
            return text
        except KubeError as exc:
            if exc.status in (400, 404):  # container not started yet, or pod gone
                return None
            raise

    async def patch_status(
        self,
        kind: str,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None,
    ) -> dict[str, Any]:
        """Replace-by-merge the status; with ``resource_version`` a concurrent write gives 409."""
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self.patch(kind, namespace, name, body, sub="status")

    async def emit_event(
        self,
        involved: Mapping[str, Any],
        type_: str,
        reason: str,
        message: str,
        component: str = EVENT_SOURCE,
    ) -> None:
        """Record a core/v1 Event about ``involved`` (best effort: failures are logged)."""
        meta = involved.get("metadata") or {}
        now = now_rfc3339()
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S%f")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{stamp}", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason[:128],
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._acall(
                "POST", collection_path("Event", str(meta.get("namespace"))), body=event
            )
        except KubeError as exc:
            log.warning("could not record event %s on %s: %s", reason, meta.get("name"), exc)
