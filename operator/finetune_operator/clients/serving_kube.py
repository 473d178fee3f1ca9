"""Kubernetes API calls of the AdapterDeployment controller.

Dicts in, dicts out, over the official client's generic ``call_api`` (credentials, TLS),
so custom resources and every Deployment field survive a round trip untouched. Calls
block, so each runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from ..api.common import GROUP, VERSION

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

_COLLECTIONS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "FineTuneJob": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/finetunejobs",
    "AdapterDeployment": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/adapterdeployments",
}


class ServingKubeError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def conflict(self) -> bool:
        """Lost a race: 409, or 422 from a failed JSON-patch ``test`` (resourceVersion moved)."""
        return self.status in (409, 422)


def _path(kind: str, ns: str, name: str | None = None, sub: str = "") -> str:
    path = _COLLECTIONS[kind].format(ns=quote(ns, safe=""))
    if name is not None:
        path += "/" + quote(name, safe="")
    return path + ("/" + sub if sub else "")


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class ServingKube:
    def __init__(self, api_client: Any) -> None:
        self._api = api_client

    @classmethod
    def from_environment(cls) -> ServingKube:
        from .kube import api_client_from_environment

        return cls(api_client_from_environment())

    def _call(
        self, method: str, path: str, *, body: Any = None, query: Mapping[str, str] | None = None,
        content_type: str = JSON,
    ) -> Any:  # fmt: skip
        headers = {"Accept": JSON, "Content-Type": content_type}
        resource = path + ("?" + urlencode(query) if query else "")
        _m, url, hdrs, _b, _p = self._api.param_serialize(
            method, resource, header_params=headers, auth_settings=["BearerToken"]
        )
        response = self._api.call_api(method, url, header_params=hdrs, body=body)
        data = response.read()
        if response.status >= 400:
            try:
                detail = json.loads(data)
                message, reason = str(detail.get("message", "")), str(detail.get("reason", ""))
            except (ValueError, AttributeError):
                message, reason = (data or b"").decode(errors="replace")[:500], ""
            raise ServingKubeError(response.status, message, reason)
        return json.loads(data) if data else {}

    async def _acall(self, method: str, path: str, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self._call, method, path, **kwargs)

    async def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._acall("GET", _path(kind, ns, name))
            return result
        except ServingKubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_objects(
        self, kind: str, ns: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        query = (
            {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        )
        result = await self._acall("GET", _path(kind, ns), query=query)
        # Filter here as well: not every API server (or emulator) honours labelSelector.
        return [i for i in result.get("items") or [] if matches_labels(i, labels)]

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        result: dict[str, Any] = await self._acall(
            "POST", _path(body["kind"], meta["namespace"]), body=dict(body)
        )
        return result

    async def delete(self, kind: str, ns: str, name: str) -> bool:
        try:
            await self._acall(
                "DELETE", _path(kind, ns, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            )  # fmt: skip
            return True
        except ServingKubeError as exc:
            if exc.status == 404:
                return False
            raise

    async def json_patch(
        self, kind: str, ns: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._acall(
            "PATCH", _path(kind, ns, name), body=ops, content_type=JSON_PATCH
        )
        return result

    async def patch_status(
        self, kind: str, ns: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._acall(
            "PATCH",
            _path(kind, ns, name, "status"),
            body={"status": dict(status)},
            content_type=MERGE_PATCH,
        )
        return result
