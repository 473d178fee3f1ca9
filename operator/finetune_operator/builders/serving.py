"""Pure builders for serving: the Deployment edits that roll an adapter in or out.

Every function takes the observed Deployment (a dict as the API returns it) and returns
new dicts; nothing here talks to the API. Everything an AdapterDeployment writes into a
shared serving Deployment is named after its adapter, so several AdapterDeployments can
edit one Deployment without touching each other's entries:

- its ``--lora-modules`` entry (see :mod:`finetune_operator.serving.vllm_args`),
- a volume ``adapter-<name>`` and its mount, and for s3/hf adapters an init container
  ``fetch-adapter-<name>`` that downloads and verifies the adapter,
- the pod-template annotation ``finetune.dev/adapter-<name>-digest`` (a new digest means
  a new pod template, hence a rollout, even when the path stays the same),
- the Deployment annotation ``finetune.dev/adapter-<name>-owner`` (which
  AdapterDeployment owns the name on this Deployment).

The patch is a JSON patch whose first operation tests ``metadata.resourceVersion``: when
another writer changed the Deployment in between, the API server rejects the patch
(409/422) and the caller re-reads and rebuilds it, so concurrent rollouts of different
adapters never overwrite each other's entries.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..api.adapterdeployment import KIND as ADEP_KIND
from ..api.common import owner_reference
from ..domain.uris import StorageUri
from ..serving import vllm_args
from ..serving.vllm_server import find_vllm_container

ANNOTATION_PREFIX = "finetune.dev/"
CANARY_LABEL = "finetune.dev/canary"
ADEP_LABEL = "finetune.dev/adapterdeployment"
MANAGED_BY = {"app.kubernetes.io/managed-by": "finetune-operator"}
ADAPTER_ROOT = "/finetune/adapters"
FETCH_ROOT = "/finetune/fetch"
FETCH_COMMAND = ["python", "-m", "finetune_trainer.fetch"]
_SUFFIX_MAX = 40


@dataclass(frozen=True)
class AdapterRef:
    """One adapter version to serve under ``name`` (the model name clients request)."""

    name: str
    uri: str
    digest: str
    base_model: str | None = None
    rank: int | None = None
    credentials_secret: str | None = None


@dataclass(frozen=True)
class ServerArgChanges:
    """Server flags the operator may change (only with ``target.allowServerArgChanges``)."""

    enable_lora: bool = False
    max_lora_rank: int | None = None
    max_loras: int | None = None

    def any(self) -> bool:
        return self.enable_lora or self.max_lora_rank is not None or self.max_loras is not None


# ------------------------------------------------------------------ names


def owned_suffix(adapter_name: str) -> str:
    """A DNS-label-safe form of the adapter name, unique per name.

    Adapter names may hold upper case, dots and underscores and be 128 characters long;
    volume, container and annotation names may not. A short hash keeps two names that
    map to the same label (``a.b`` and ``a_b``) apart.
    """
    label = re.sub(r"[^a-z0-9-]", "-", adapter_name.lower()).strip("-") or "adapter"
    if label == adapter_name and len(label) <= _SUFFIX_MAX:
        return label
    tag = hashlib.sha256(adapter_name.encode()).hexdigest()[:8]
    return f"{label[: _SUFFIX_MAX - 9].rstrip('-')}-{tag}"


def digest_annotation(adapter_name: str) -> str:
    return f"{ANNOTATION_PREFIX}adapter-{owned_suffix(adapter_name)}-digest"


def owner_annotation(adapter_name: str) -> str:
    return f"{ANNOTATION_PREFIX}adapter-{owned_suffix(adapter_name)}-owner"


def volume_name(adapter_name: str) -> str:
    return f"adapter-{owned_suffix(adapter_name)}"


def init_container_name(adapter_name: str) -> str:
    return f"fetch-adapter-{owned_suffix(adapter_name)}"


def mount_path(adapter_name: str) -> str:
    return f"{ADAPTER_ROOT}/{owned_suffix(adapter_name)}"


def canary_name(adep_name: str) -> str:
    """Name of the canary Deployment of one AdapterDeployment."""
    name = f"{adep_name}-canary"
    if len(name) <= 63:
        return name
    tag = hashlib.sha256(adep_name.encode()).hexdigest()[:6]
    return f"{adep_name[:49].rstrip('-')}-{tag}-canary"


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Placement:
    """How the adapter's files reach the server container, and the path vLLM loads."""

    path: str
    volume: dict[str, Any] | None = None
    mount: dict[str, Any] | None = None
    init_container: dict[str, Any] | None = None


def placement(ref: AdapterRef, fetch_image: str) -> Placement:
    """Volume, mount and init container that make ``ref`` readable at a fixed path.

    ``pvc://claim/dir`` mounts the claim read-only with ``subPath: dir``; ``file:///dir``
    is used as is (the directory must exist in the image or on a volume already mounted);
    ``s3://`` and ``hf://`` are fetched by ``python -m finetune_trainer.fetch`` (the trainer
    image) into an emptyDir; ``--digest`` makes it check the manifest before the server
    starts.
    """
    name = ref.name
    path = mount_path(name)
    uri = StorageUri.parse(ref.uri)
    if uri.scheme == "file":
        return Placement(path=uri.path)
    if uri.scheme == "pvc":
        mount: dict[str, Any] = {"name": volume_name(name), "mountPath": path, "readOnly": True}
        if uri.path:
            mount["subPath"] = uri.path
        volume = {
            "name": volume_name(name),
            "persistentVolumeClaim": {"claimName": uri.claim, "readOnly": True},
        }
        return Placement(path=path, volume=volume, mount=mount)
    # The init container sees the whole emptyDir (adapter + a writable HOME for caches);
    # the server sees only the adapter, read-only.
    volume = {"name": volume_name(name), "emptyDir": {}}
    init: dict[str, Any] = {
        "name": init_container_name(name),
        "image": fetch_image,
        "command": list(FETCH_COMMAND),
        "args": ["--uri", ref.uri, "--dest", f"{FETCH_ROOT}/adapter", "--digest", ref.digest],
        "env": [
            {"name": "HOME", "value": f"{FETCH_ROOT}/home"},
            {"name": "HF_HOME", "value": f"{FETCH_ROOT}/home/hf"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "volumeMounts": [{"name": volume_name(name), "mountPath": FETCH_ROOT}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if ref.credentials_secret:
        # Only the Secret's name travels; the kubelet injects its values into this step only.
        init["envFrom"] = [{"secretRef": {"name": ref.credentials_secret}}]
    mount = {"name": volume_name(name), "mountPath": path, "subPath": "adapter", "readOnly": True}
    fetched = uri.fetched_path(f"{FETCH_ROOT}/adapter")
    return Placement(
        path=path + fetched[len(f"{FETCH_ROOT}/adapter") :],
        volume=volume,
        mount=mount,
        init_container=init,
    )


# ------------------------------------------------------------------ pod template edits


def find_container(
    pod_spec: dict[str, Any],
    container: str | None,
    image_patterns: tuple[str, ...] | None = None,
) -> int:
    """Index of the named container (default: the one running vLLM, else the first)."""
    containers = pod_spec.get("containers") or []
    if not containers:
        raise ValueError("the Deployment's pod template has no containers")
    if container is None:
        found, _ = find_vllm_container(pod_spec, None, image_patterns)
        return found or 0
    for i, c in enumerate(containers):
        if c.get("name") == container:
            return i
    names = ", ".join(str(c.get("name")) for c in containers)
    raise ValueError(f"container {container!r} not found in the pod template (have: {names})")


def _replace_named(items: list[dict[str, Any]], name: str, new: dict[str, Any] | None) -> list[Any]:
    """Replace (or drop, when ``new`` is None) the item called ``name``; append when absent."""
    out: list[Any] = []
    seen = False
    for item in items:
        if item.get("name") == name:
            seen = True
            if new is not None:
                out.append(new)
        else:
            out.append(item)
    if not seen and new is not None:
        out.append(new)
    return out


def apply_server_changes(
    container: dict[str, Any],
    changes: ServerArgChanges,
    edit: vllm_args.EditContext | None = None,
) -> dict[str, Any]:
    """Raise the flags in ``changes`` (``edit``: image patterns and the --config reader)."""
    out = container
    if changes.enable_lora:
        out = vllm_args.ensure_enable_lora(out, edit)
    if changes.max_lora_rank is not None:
        out = vllm_args.set_max_lora_rank(out, changes.max_lora_rank, edit)
    if changes.max_loras is not None:
        out = vllm_args.set_max_loras(out, changes.max_loras, edit)
    return out


def with_adapter(
    template: dict[str, Any],
    container: str | None,
    adapter_name: str,
    ref: AdapterRef | None,
    *,
    fetch_image: str,
    changes: ServerArgChanges | None = None,
    edit: vllm_args.EditContext | None = None,
) -> dict[str, Any]:
    """The pod template serving ``ref`` under ``adapter_name`` (or none, when ``ref`` is None).

    Only entries owned by ``adapter_name`` change; the input is not modified. ``edit``
    (:func:`finetune_operator.serving.vllm_server.edit_context`) lets the command-line edits see
    the vLLM image patterns and the server's --config file.
    """
    tpl = copy.deepcopy(template)
    spec = tpl.setdefault("spec", {})
    patterns = edit.image_patterns if edit else None
    idx = find_container(spec, container, tuple(patterns) if patterns else None)
    main = spec["containers"][idx]
    vol = volume_name(adapter_name)
    annotations = dict((tpl.get("metadata") or {}).get("annotations") or {})
    if ref is None:
        main = vllm_args.remove_lora_module(main, adapter_name, edit)
        place = None
        annotations.pop(digest_annotation(adapter_name), None)
    else:
        place = placement(ref, fetch_image)
        module = vllm_args.LoraModule(
            adapter_name, place.path, base_model_name=None, json_form=False
        )
        main = vllm_args.set_lora_module(main, module, edit)
        annotations[digest_annotation(adapter_name)] = ref.digest
    if changes is not None:
        main = apply_server_changes(main, changes, edit)
    mounts = _replace_named(
        list(main.get("volumeMounts") or []), vol, place.mount if place else None
    )
    main = {**main, "volumeMounts": mounts} if mounts or "volumeMounts" in main else main
    spec["containers"][idx] = main
    volumes = _replace_named(list(spec.get("volumes") or []), vol, place.volume if place else None)
    if volumes or "volumes" in spec:
        spec["volumes"] = volumes
    inits = _replace_named(
        list(spec.get("initContainers") or []),
        init_container_name(adapter_name),
        place.init_container if place else None,
    )
    if inits or "initContainers" in spec:
        spec["initContainers"] = inits
    tpl.setdefault("metadata", {})["annotations"] = annotations
    return tpl


# ------------------------------------------------------------------ JSON patches


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def rollout_patch(
    deployment: dict[str, Any],
    container: str | None,
    adapter_name: str,
    ref: AdapterRef | None,
    *,
    owner: str,
    fetch_image: str,
    changes: ServerArgChanges | None = None,
    edit: vllm_args.EditContext | None = None,
) -> list[dict[str, Any]]:
    """JSON patch that serves ``ref`` (or removes the adapter) on a Deployment.

    The first operation tests ``metadata.resourceVersion`` so the patch applies only to
    the exact object it was computed from. Used for Rolling rollouts, canary promotion
    and rollback (``ref`` = the previous revision, or None when there was none).
    """
    meta = deployment.get("metadata") or {}
    rv = meta.get("resourceVersion")
    if not rv:
        raise ValueError("the Deployment has no metadata.resourceVersion to guard the patch")
    template = (deployment.get("spec") or {}).get("template") or {}
    new_tpl = with_adapter(
        template, container, adapter_name, ref, fetch_image=fetch_image, changes=changes, edit=edit
    )
    old_spec = template.get("spec") or {}
    new_spec = new_tpl["spec"]
    patterns = edit.image_patterns if edit else None
    idx = find_container(old_spec, container, tuple(patterns) if patterns else None)
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}]
    base = f"/spec/template/spec/containers/{idx}"
    old_main = old_spec["containers"][idx]
    new_main = new_spec["containers"][idx]
    # Guard the index as well: the container at idx must still be the one we edited.
    ops.append({"op": "test", "path": f"{base}/name", "value": old_main.get("name")})
    for key in ("command", "args", "volumeMounts"):
        if new_main.get(key) != old_main.get(key):
            if key in new_main:
                ops.append({"op": "add", "path": f"{base}/{key}", "value": new_main[key]})
            else:
                ops.append({"op": "remove", "path": f"{base}/{key}"})
    for key in ("volumes", "initContainers"):
        if new_spec.get(key) != old_spec.get(key):
            ops.append({"op": "add", "path": f"/spec/template/spec/{key}", "value": new_spec[key]})
    old_ann = (template.get("metadata") or {}).get("annotations")
    new_ann = new_tpl["metadata"]["annotations"]
    if old_ann is None:
        if "metadata" not in template:
            ops.append({"op": "add", "path": "/spec/template/metadata", "value": {}})
        ops.append({"op": "add", "path": "/spec/template/metadata/annotations", "value": new_ann})
    else:
        key = digest_annotation(adapter_name)
        path = f"/spec/template/metadata/annotations/{_escape(key)}"
        if key in new_ann and old_ann.get(key) != new_ann[key]:
            ops.append({"op": "add", "path": path, "value": new_ann[key]})
        elif key not in new_ann and key in old_ann:
            ops.append({"op": "remove", "path": path})
    ops.extend(_owner_ops(meta, adapter_name, owner if ref is not None else None))
    return ops


def _owner_ops(meta: dict[str, Any], adapter_name: str, owner: str | None) -> list[dict[str, Any]]:
    key = owner_annotation(adapter_name)
    annotations = meta.get("annotations")
    if owner is None:
        if annotations and key in annotations:
            return [{"op": "remove", "path": f"/metadata/annotations/{_escape(key)}"}]
        return []
    if annotations is None:
        return [{"op": "add", "path": "/metadata/annotations", "value": {key: owner}}]
    if annotations.get(key) == owner:
        return []
    return [{"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": owner}]


def patch_changes_anything(ops: list[dict[str, Any]]) -> bool:
    return any(op["op"] != "test" for op in ops)


# ------------------------------------------------------------------ canary


def canary_deployment(
    target: dict[str, Any],
    adep: dict[str, Any],
    container: str | None,
    ref: AdapterRef,
    *,
    replicas: int,
    fetch_image: str,
    changes: ServerArgChanges | None = None,
    edit: vllm_args.EditContext | None = None,
) -> dict[str, Any]:
    """A copy of ``target`` that serves ``ref``, for canary analysis.

    Its pods carry every label of the target's pods, so the target's Service sends them
    a share of the traffic (replicas / (replicas + target replicas)), plus the canary
    label, which the canary's own selector adds so the two Deployments never count
    each other's pods. Owned by the AdapterDeployment (deleted with it).
    """
    adep_meta: dict[str, Any] = adep.get("metadata") or {}
    adep_name = str(adep_meta.get("name"))
    t_spec = target.get("spec") or {}
    template = with_adapter(
        t_spec.get("template") or {},
        container,
        ref.name,
        ref,
        fetch_image=fetch_image,
        changes=changes,
        edit=edit,
    )
    tpl_meta = template.setdefault("metadata", {})
    tpl_meta["labels"] = {**(tpl_meta.get("labels") or {}), CANARY_LABEL: adep_name}
    selector = copy.deepcopy(t_spec.get("selector") or {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), CANARY_LABEL: adep_name}
    spec: dict[str, Any] = {
        "replicas": replicas,
        "selector": selector,
        "template": template,
    }
    for key in ("minReadySeconds", "progressDeadlineSeconds", "strategy"):
        if key in t_spec:
            spec[key] = copy.deepcopy(t_spec[key])
    t_meta = target.get("metadata") or {}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": canary_name(adep_name),
            "namespace": t_meta.get("namespace") or adep_meta.get("namespace"),
            "labels": {**MANAGED_BY, ADEP_LABEL: adep_name, CANARY_LABEL: adep_name},
            "annotations": {digest_annotation(ref.name): ref.digest},
            "ownerReferences": [owner_reference(ADEP_KIND, adep_name, str(adep_meta.get("uid")))],
        },
        "spec": spec,
    }
