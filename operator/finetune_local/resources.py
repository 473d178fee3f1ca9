"""The API resources the embedded API server serves (what discovery announces)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from finetune_operator.api.common import GROUP, VERSION

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    """One served resource: where it lives in the URL space and how it behaves."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    extra_subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    singular: str = ""
    verbs: tuple[str, ...] = field(default=ALL_VERBS)
    # Built-in types accept a PUT without metadata.resourceVersion; custom resources do not.
    unconditional_update: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def subresources(self) -> tuple[str, ...]:
        return (("status",) if self.status_subresource else ()) + self.extra_subresources


_core = partial(ResourceType, "", "v1")


FINETUNEJOBS = ResourceType(
    GROUP, VERSION, "finetunejobs", "FineTuneJob", status_subresource=True,
    short_names=("ftj",), categories=("finetune",), singular="finetunejob", unconditional_update=False,
)  # fmt: skip
ADAPTERDEPLOYMENTS = ResourceType(
    GROUP, VERSION, "adapterdeployments", "AdapterDeployment", status_subresource=True,
    short_names=("adep",), categories=("finetune",), singular="adapterdeployment", unconditional_update=False,
)  # fmt: skip
FINETUNESCHEDULES = ResourceType(
    GROUP, VERSION, "finetuneschedules", "FineTuneSchedule", status_subresource=True,
    short_names=("ftsched",), categories=("finetune",), singular="finetuneschedule", unconditional_update=False,
)  # fmt: skip

DEFAULT_RESOURCES: tuple[ResourceType, ...] = (
    FINETUNEJOBS,
    ADAPTERDEPLOYMENTS,
    FINETUNESCHEDULES,
    _core("pods", "Pod", status_subresource=True, extra_subresources=("log",), short_names=("po",)),
    _core("configmaps", "ConfigMap", short_names=("cm",)),
    _core("secrets", "Secret"),
    _core("services", "Service", status_subresource=True, short_names=("svc",)),
    _core("events", "Event", short_names=("ev",)),
    _core("persistentvolumeclaims", "PersistentVolumeClaim", status_subresource=True, short_names=("pvc",)),
    _core("nodes", "Node", namespaced=False, status_subresource=True, short_names=("no",)),
    _core("serviceaccounts", "ServiceAccount", short_names=("sa",)),
    _core("namespaces", "Namespace", namespaced=False, status_subresource=True, short_names=("ns",)),
    ResourceType("apps", "v1", "deployments", "Deployment", status_subresource=True,
                 extra_subresources=("scale",), short_names=("deploy",)),
    ResourceType("batch", "v1", "jobs", "Job", status_subresource=True),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    ResourceType("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False,
                 unconditional_update=False),
    ResourceType("kopf.dev", "v1", "kopfpeerings", "KopfPeering", unconditional_update=False),
)  # fmt: skip
