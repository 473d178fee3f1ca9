"""Kubernetes API calls of the AdapterDeployment controller.

Transport, credentials, paths and errors are the operator's one client's
(:class:`~finetune_operator.clients.kube.KubeClient`). This adds the verbs in the shapes the
serving controller wants: a create that reports a name clash instead of adopting the
existing object, JSON patches (their ``test`` operations give optimistic concurrency on the
Deployment's ``--lora-modules`` list) and status merge patches without a precondition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .kube import (
    JSON_PATCH,
    MERGE_PATCH,
    KubeClient,
    api_client_from_environment,
    collection_path,
    object_path,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


class ServingKube:
    """The serving controller's verbs over the operator's one client (or a new client of a
    ``kubernetes.client.ApiClient``)."""

    def __init__(self, client: KubeClient | ApiClient) -> None:
        self._kube = client if isinstance(client, KubeClient) else KubeClient(client)

    @classmethod
    def from_environment(cls) -> ServingKube:
        return cls(api_client_from_environment())

    async def close(self) -> None:
        await self._kube.close()

    async def get(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        return await self._kube.get(kind, ns, name)

    async def list_objects(
        self, kind: str, ns: str, labels: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        return await self._kube.list(kind, ns, labels)

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        result: dict[str, Any] = await self._kube.request(
            "POST", collection_path(body["kind"], meta["namespace"]), body=dict(body)
        )
        return result

    async def delete(self, kind: str, ns: str, name: str) -> bool:
        return await self._kube.delete(kind, ns, name)

    async def json_patch(
        self, kind: str, ns: str, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._kube.request(
            "PATCH", object_path(kind, ns, name), body=ops, content_type=JSON_PATCH
        )
        return result

    async def patch_status(
        self, kind: str, ns: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._kube.request(
            "PATCH", object_path(kind, ns, name, "status"), body={"status": dict(status)},
            content_type=MERGE_PATCH,
        )  # fmt: skip
        return result
