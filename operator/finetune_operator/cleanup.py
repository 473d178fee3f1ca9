"""``finetune-operator cleanup``: take the operator's finalizer off its objects when no
operator is left to do it.

Every FineTuneJob, AdapterDeployment and FineTuneSchedule carries the finalizer
``finetune.dev/cleanup`` while the operator handles it. Once the operator is uninstalled nothing removes it, so deleting such
an object (or its CRD, which deletes them all) waits forever. This command removes only that
finalizer (others stay), by default only from objects already being deleted; their trainer
Jobs, ConfigMaps and canary Deployments are owned by them and go with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .api.adapterdeployment import PLURAL as AD_PLURAL
from .api.common import GROUP, VERSION
from .api.finetunejob import PLURAL as FTJ_PLURAL
from .api.finetuneschedule import PLURAL as FTS_PLURAL
from .builders.names import FINALIZER
from .clients.kube import JSON_PATCH, KubeClient, KubeError, collection_path, object_path

KINDS = (
    ("FineTuneJob", FTJ_PLURAL),
    ("AdapterDeployment", AD_PLURAL),
    ("FineTuneSchedule", FTS_PLURAL),
)
# A concurrent change of the finalizer list (another controller) makes the patch's test fail;
# read again and retry this many times.
PATCH_ATTEMPTS = 5


@dataclass(frozen=True)
class Released:
    kind: str
    namespace: str
    name: str
    deleting: bool

    def line(self, dry_run: bool) -> str:
        verb = "would release" if dry_run else "released"
        state = "being deleted: now removed" if self.deleting else "kept, without the finalizer"
        if dry_run:
            state = "being deleted" if self.deleting else "not being deleted"
        return f"{verb} {self.kind} {self.namespace}/{self.name} ({state})"


async def _objects(
    kube: KubeClient, kind: str, plural: str, namespace: str | None
) -> list[dict[str, Any]]:
    path = (
        f"/apis/{GROUP}/{VERSION}/{plural}"
        if namespace is None
        else collection_path(kind, namespace)
    )
    try:
        result = await kube.request("GET", path)
    except KubeError as exc:
        if exc.not_found:  # the CRD is not installed (any more): nothing of this kind
            return []
        raise
    return list(result.get("items") or [])


async def _remove_finalizer(kube: KubeClient, kind: str, namespace: str, name: str) -> None:
    for _attempt in range(PATCH_ATTEMPTS):
        try:
            current = await kube.get(kind, namespace, name)
        except KubeError as exc:
            if exc.not_found:
                return
            raise
        finalizers = list(((current or {}).get("metadata") or {}).get("finalizers") or [])
        if current is None or FINALIZER not in finalizers:
            return
        # Test-then-replace: never drop a finalizer another controller added meanwhile.
        ops = [
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {
                "op": "replace",
                "path": "/metadata/finalizers",
                "value": [f for f in finalizers if f != FINALIZER],
            },
        ]
        try:
            await kube.request(
                "PATCH", object_path(kind, namespace, name), body=ops, content_type=JSON_PATCH
            )
            return
        except KubeError as exc:
            if exc.not_found:
                return
            if not exc.conflict:
                raise
    raise KubeError(409, f"{kind} {namespace}/{name}: its finalizers kept changing; run again")


async def release_finalizers(
    kube: KubeClient,
    namespaces: Sequence[str] = (),
    *,
    include_live: bool = False,
    dry_run: bool = False,
) -> list[Released]:
    """Remove the operator's finalizer from objects being deleted (with ``include_live``: from
    every object) in ``namespaces`` (empty: all); return what was (or would be) released."""
    released: list[Released] = []
    for kind, plural in KINDS:
        scopes: list[str | None] = list(namespaces) or [None]
        for namespace in scopes:
            for obj in await _objects(kube, kind, plural, namespace):
                meta = obj.get("metadata") or {}
                deleting = bool(meta.get("deletionTimestamp"))
                if FINALIZER not in (meta.get("finalizers") or []):
                    continue
                if not deleting and not include_live:
                    continue
                if not dry_run:
                    await _remove_finalizer(kube, kind, meta["namespace"], meta["name"])
                released.append(Released(kind, meta["namespace"], meta["name"], deleting))
    return released
