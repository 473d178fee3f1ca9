"""An embedded Kubernetes API server that behaves like the real one where the operator cares.

Built on kmock's `KubernetesScaffold` (HTTP serving, API discovery, error rendering); the
object store and the write semantics are implemented here: uid, monotonic
resourceVersion, generation, creationTimestamp, finalizers and deletionTimestamp, the
status subresource, label/field selectors, generateName, optimistic concurrency (409),
failed JSON-patch tests (422), garbage collection by ownerReferences, watches that
resume from a resourceVersion, pod logs, schema validation of our custom resources,
request counters and fault injection.

The store is guarded by a thread lock, so tests (acting as "the cluster") may call the
helpers from any thread while the HTTP server runs in its own thread and event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
from finetune_operator.domain.times import now_rfc3339

from . import patching
from .resources import DEFAULT_RESOURCES, ResourceType
from .selectors import Matcher, SelectorError, parse_field_selector, parse_label_selector

logger = logging.getLogger(__name__)

ObjectKey = tuple[tuple[str, str, str], str | None, str]
Body = dict[str, Any]
Validator = Callable[[Body, Body | None], list[str]]

_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_SERVER_MANAGED_METADATA = (
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "name",
    "namespace",
)


def _status_error(
    status: int, reason: str, message: str, details: Any = None
) -> kmock.KubernetesError:
    return kmock.KubernetesError(
        status=status, reason=reason, message=message, details=details or {}
    )


def _not_found(rtype: ResourceType, name: str) -> kmock.KubernetesError:
    return _status_error(
        404, "NotFound", f'{rtype.plural}.{rtype.group or "core"} "{name}" not found',
        {"name": name, "group": rtype.group, "kind": rtype.plural},
    )  # fmt: skip


def _spec_part(body: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that counts towards metadata.generation (all but metadata and status)."""
    return {k: v for k, v in body.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _selected_event_type(
    event_type: str, matches_now: bool, previous: Body | None, matches: Matcher
) -> str | None:
    """What a selector-filtered watch sees: objects entering the selection are ADDED, leaving ones DELETED."""
    if event_type != "MODIFIED" or previous is None:
        return event_type if matches_now else None
    matched_before = matches(previous)
    if matches_now:
        return "MODIFIED" if matched_before else "ADDED"
    return "DELETED" if matched_before else None


@dataclass
class Fault:
    """Answer the next `remaining` matching requests with an error instead of serving them."""

    status: int
    plural: str | None = None
    subresource: str | None = None  # None: the main resource only; "*": any
    verbs: frozenset[str] = frozenset({"patch", "update"})
    name: str | None = None
    remaining: int = 1
    reason: str = ""
    message: str = "injected fault"
    retry_after_seconds: int | None = None
    served: int = 0

    def matches(
        self, verb: str, rtype: ResourceType, subresource: str | None, name: str | None
    ) -> bool:
        if self.remaining <= 0 or verb not in self.verbs:
            return False
        if self.plural is not None and self.plural != rtype.plural:
            return False
        if self.subresource != "*" and self.subresource != subresource:
            return False
        return self.name is None or self.name == name


@dataclass(frozen=True)
class WriteRecord:
    """One write that reached the store (for assertions and the scale benchmark)."""

    verb: str
    plural: str
    subresource: str | None
    namespace: str | None
    name: str
    changed: bool


@dataclass
class _Watcher:
    rtype: ResourceType
    namespace: str | None
    matches: Matcher
    queue: asyncio.Queue[tuple[int, Body] | None]
    loop: asyncio.AbstractEventLoop
    since: int


@dataclass
class _ParsedPath:
    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_resource_path(path: str) -> _ParsedPath | None:
    """Split an API path into its parts; None for discovery and non-resource paths."""
    parts = [part for part in path.strip("/").split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace: str | None = None
    is_namespace_itself = (
        group == "" and len(rest) <= 3 and (len(rest) < 3 or rest[2] in ("status", "finalize"))
    )
    if rest[0] == "namespaces" and len(rest) >= 3 and not is_namespace_itself:
        namespace, rest = rest[1], rest[2:]
    return _ParsedPath(
        group=group, version=version, plural=rest[0],
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )  # fmt: skip


class Emulator(kmock.KubernetesScaffold):
    """The embedded API server: kmock's scaffold plus a realistic object store.

    Options:
        resources: the resource types to serve (default: ours, core, apps, batch, leases,
            events, kopf peerings).
        crd_dir: a folder with CustomResourceDefinition YAML; when given (and
            `validate_schemas` is on), our custom resources are validated on create
            and update against the CRDs' openAPIV3Schema, with defaults applied.
        validate_schemas: turn schema validation on or off.
        event_log_limit: how many watch events per resource are kept for resuming
            watches; older resourceVersions get 410 Gone like a compacted etcd.
        keep_requests: how many raw requests kmock keeps for inspection.
        namespaces: Namespace objects that exist from the start.
    """

    def __init__(
        self,
        *,
        resources: Iterable[ResourceType] = DEFAULT_RESOURCES,
        crd_dir: str | Path | None = None,
        validate_schemas: bool = False,
        event_log_limit: int = 20_000,
        keep_requests: int = 2_000,
        namespaces: Iterable[str] = ("default", "kube-system"),
    ) -> None:
        super().__init__()
        self._store_lock = threading.RLock()
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._objects: dict[ObjectKey, Body] = {}
        # Per resource: (resourceVersion, event, the object before that change) — the
        # previous version lets a resumed selector watch see objects enter and leave.
        self._events: dict[tuple[str, str, str], list[tuple[int, Body, Body | None]]] = {}
        self._compacted_rv: dict[tuple[str, str, str], int] = {}
        self._watchers: list[_Watcher] = []
        self._last_rv = 1000
        self._pod_logs: dict[tuple[str | None, str, str | None], str] = {}
        self._faults: list[Fault] = []
        self._validators: dict[tuple[str, str, str], Validator] = {}
        self._defaulters: dict[tuple[str, str, str], Callable[[Body], Body]] = {}
        self.event_log_limit = event_log_limit
        self.keep_requests = keep_requests
        self.request_counts: Counter[tuple[str, str]] = Counter()
        self.writes: list[WriteRecord] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        for rtype in resources:
            self.add_resource(rtype)
        if ("", "v1", "namespaces") in self._types:
            for namespace in namespaces:
                self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace},
                             "status": {"phase": "Active"}})  # fmt: skip
        if crd_dir is not None and validate_schemas:
            self.load_crds(crd_dir)

    def __repr__(self) -> str:
        return f"<Emulator: {len(self._objects)} objects, {len(self._types)} resource types>"

    # ----------------------------------------------------------------- resources

    def add_resource(self, rtype: ResourceType) -> None:
        """Serve one more resource type (and announce it in discovery)."""
        self._types[rtype.key] = rtype
        self.resources[f"{rtype.group}/{rtype.version}/{rtype.plural}"] = kmock.ResourceInfo(
            kind=rtype.kind,
            namespaced=rtype.namespaced,
            singular=rtype.singular or rtype.kind.lower(),
            verbs=set(rtype.verbs),
            shortnames=set(rtype.short_names),
            categories=set(rtype.categories),
            subresources=set(rtype.subresources),
        )

    def load_crds(self, crd_dir: str | Path) -> int:
        """Serve and validate the custom resources defined by the CRD YAML files in a folder."""
        from .schema import load_crd_file  # jsonschema and yaml are only needed here

        count = 0
        for path in sorted(Path(crd_dir).glob("*.y*ml")):
            for rtype, validator, defaulter in load_crd_file(path):
                self.add_resource(rtype)
                self._validators[rtype.key] = validator
                self._defaulters[rtype.key] = defaulter
                count += 1
        return count

    def resource_type(self, plural_or_kind: str, group: str | None = None) -> ResourceType:
        """Find a served resource by plural, kind or short name (optionally within a group)."""
        wanted = plural_or_kind.lower()
        for rtype in self._types.values():
            if group is not None and rtype.group != group:
                continue
            names = {rtype.plural, rtype.kind.lower(), *rtype.short_names}
            if wanted in names:
                return rtype
        raise KeyError(f"no served resource is called {plural_or_kind!r}")

    def _type_for(self, api_version: str, kind: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        for rtype in self._types.values():
            if rtype.group == group and rtype.version == version and rtype.kind == kind:
                return rtype
        raise KeyError(f"no served resource has apiVersion={api_version!r} kind={kind!r}")

    # ----------------------------------------------------------------- store internals

    def _next_rv(self) -> int:
        self._last_rv += 1
        return self._last_rv

    def _publish(
        self, rtype: ResourceType, event_type: str, body: Body, previous: Body | None = None
    ) -> None:
        rv = int(body["metadata"]["resourceVersion"])
        log = self._events.setdefault(rtype.key, [])
        log.append((rv, {"type": event_type, "object": body}, previous))
        if len(log) > self.event_log_limit:
            dropped = len(log) - self.event_log_limit
            self._compacted_rv[rtype.key] = log[dropped - 1][0]
            del log[:dropped]
        namespace = body["metadata"].get("namespace")
        for watcher in list(self._watchers):
            if watcher.rtype.key != rtype.key or watcher.namespace not in (None, namespace):
                continue
            seen_type = _selected_event_type(
                event_type, watcher.matches(body), previous, watcher.matches
            )
            if seen_type is None:
                continue
            item = (rv, {"type": seen_type, "object": body})
            with contextlib.suppress(RuntimeError):  # the watcher's loop is already closed
                watcher.loop.call_soon_threadsafe(watcher.queue.put_nowait, item)

    def _store(self, rtype: ResourceType, body: Body, event_type: str) -> Body:
        """Stamp a new resourceVersion, save, and notify watchers."""
        body["metadata"]["resourceVersion"] = str(self._next_rv())
        key = (rtype.key, body["metadata"].get("namespace"), body["metadata"]["name"])
        previous = self._objects.get(key)
        self._objects[key] = body
        self._publish(rtype, event_type, body, previous)
        return body

    def _remove(self, rtype: ResourceType, key: ObjectKey) -> Body:
        """Delete an object for good, then collect its dependents (background deletion)."""
        body = copy.deepcopy(self._objects.pop(key))
        body["metadata"]["resourceVersion"] = str(self._next_rv())
        self._publish(rtype, "DELETED", body)
        self._collect_garbage(body["metadata"]["uid"])
        return body

    def _collect_garbage(self, owner_uid: str) -> None:
        live_uids = {obj["metadata"]["uid"] for obj in self._objects.values()}
        for key, obj in list(self._objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            if key not in self._objects:  # removed by a nested collection meanwhile
                continue
            rtype = self._types[key[0]]
            remaining = [
                ref for ref in refs if ref.get("uid") in live_uids and ref.get("uid") != owner_uid
            ]
            if remaining:
                updated = copy.deepcopy(obj)
                updated["metadata"]["ownerReferences"] = remaining
                self._store(rtype, updated, "MODIFIED")
            else:
                self._delete_locked(rtype, key, propagation="Background")

    def _delete_locked(self, rtype: ResourceType, key: ObjectKey, propagation: str) -> Body:
        obj = self._objects[key]
        if propagation == "Orphan":
            self._orphan_dependents(obj["metadata"]["uid"])
        if obj["metadata"].get("finalizers"):
            if obj["metadata"].get("deletionTimestamp"):
                return obj
            updated = copy.deepcopy(obj)
            updated["metadata"]["deletionTimestamp"] = now_rfc3339()
            updated["metadata"]["deletionGracePeriodSeconds"] = 0
            updated["metadata"]["generation"] = int(obj["metadata"].get("generation", 1)) + 1
            return self._store(rtype, updated, "MODIFIED")
        return self._remove(rtype, key)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for key, obj in list(self._objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            kept = [ref for ref in refs if ref.get("uid") != owner_uid]
            if len(kept) != len(refs):
                updated = copy.deepcopy(obj)
                updated["metadata"]["ownerReferences"] = kept
                self._store(self._types[key[0]], updated, "MODIFIED")

    def _validate(self, rtype: ResourceType, body: Body, old: Body | None = None) -> Body:
        validator = self._validators.get(rtype.key)
        if validator is not None:
            problems = validator(body, old)
            if problems:
                name = body.get("metadata", {}).get("name", "")
                raise _status_error(
                    422, "Invalid",
                    f'{rtype.kind}.{rtype.group} "{name}" is invalid: ' + "; ".join(problems),
                    {"name": name, "group": rtype.group, "kind": rtype.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": p} for p in problems]},
                )  # fmt: skip
        defaulter = self._defaulters.get(rtype.key)
        if defaulter is not None:
            body = defaulter(body)
        return body

    # ----------------------------------------------------------------- verbs (thread-safe)

    def create_object(
        self,
        rtype: ResourceType,
        body: Body,
        namespace: str | None = None,
        *,
        keep_status: bool = False,
    ) -> Body:
        """POST semantics: name or generateName, server-managed metadata, 409 if it exists."""
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        if rtype.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, namespace):
                raise _status_error(
                    400, "BadRequest", "the namespace of the object does not match the URL"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        body.setdefault("apiVersion", rtype.api_version)
        body.setdefault("kind", rtype.kind)
        if rtype.status_subresource and not keep_status:
            body.pop("status", None)  # the status subresource owns status, even on create
        with self._store_lock:
            if not meta.get("name"):
                prefix = meta.get("generateName")
                if not prefix:
                    raise _status_error(
                        422, "Invalid", "metadata.name or metadata.generateName is required"
                    )
                for _ in range(100):
                    candidate = prefix + "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
                    if (rtype.key, namespace, candidate) not in self._objects:
                        meta["name"] = candidate
                        break
            key = (rtype.key, namespace, meta["name"])
            if key in self._objects:
                raise _status_error(
                    409, "AlreadyExists", f'{rtype.plural}.{rtype.group or "core"} "{meta["name"]}" already exists',
                    {"name": meta["name"], "group": rtype.group, "kind": rtype.plural},
                )  # fmt: skip
            for managed in (
                "uid",
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ):
                meta.pop(managed, None)
            body = self._validate(rtype, body)
            meta = body["metadata"]
            meta["uid"] = str(uuid.uuid4())
            meta["generation"] = 1
            meta["creationTimestamp"] = now_rfc3339()
            return copy.deepcopy(self._store(rtype, body, "ADDED"))

    def update_object(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        change: Callable[[Body], Body],
        *,
        subresource: str | None = None,
        expected_rv: str | None = None,
        verb: str = "patch",
    ) -> Body:
        """PUT/PATCH semantics for the main resource or its status subresource."""
        with self._store_lock:
            key = (rtype.key, namespace if rtype.namespaced else None, name)
            old = self._objects.get(key)
            if old is None:
                raise _not_found(rtype, name)
            try:
                candidate = change(copy.deepcopy(old))
            except patching.PatchTestFailed as exc:
                raise _status_error(422, "Invalid", f"the JSON patch test failed: {exc}") from exc
            except patching.InvalidPatch as exc:
                raise _status_error(422, "Invalid", f"the patch cannot be applied: {exc}") from exc
            requested_rv = expected_rv or (candidate.get("metadata") or {}).get("resourceVersion")
            if verb == "update" and not requested_rv and not rtype.unconditional_update:
                raise _status_error(
                    422, "Invalid",
                    f'{rtype.kind}.{rtype.group} "{name}" is invalid: metadata.resourceVersion: '
                    "Invalid value: 0x0: must be specified for an update",
                )  # fmt: skip
            if requested_rv and requested_rv != old["metadata"]["resourceVersion"]:
                raise _status_error(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {rtype.plural}.{rtype.group or "core"} "{name}": '
                    "the object has been modified; please apply your changes to the latest version and try again",
                    {"name": name, "group": rtype.group, "kind": rtype.plural},
                )  # fmt: skip
            new = self._merge_by_subresource(rtype, old, candidate, subresource)
            # status writes are validated too, like the real server
            new = self._validate(rtype, new, old)
            changed = new != old
            self._record_write(verb, rtype, subresource, namespace, name, changed)
            if not changed:
                return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no event
            if _spec_part(new) != _spec_part(old):
                new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            stored = self._store(rtype, new, "MODIFIED")
            if stored["metadata"].get("deletionTimestamp") and not stored["metadata"].get(
                "finalizers"
            ):
                self._remove(rtype, key)
            return copy.deepcopy(stored)

    def _merge_by_subresource(
        self, rtype: ResourceType, old: Body, candidate: Body, subresource: str | None
    ) -> Body:
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
            return new
        if subresource is not None:
            raise _status_error(
                404, "NotFound", f"the subresource {subresource!r} cannot be written here"
            )
        new = candidate
        if rtype.status_subresource:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for managed in _SERVER_MANAGED_METADATA:
            if managed in old["metadata"]:
                meta[managed] = old["metadata"][managed]
            else:
                meta.pop(managed, None)
        new["apiVersion"] = old.get("apiVersion", rtype.api_version)
        new["kind"] = old.get("kind", rtype.kind)
        return new

    def _record_write(
        self,
        verb: str,
        rtype: ResourceType,
        sub: str | None,
        ns: str | None,
        name: str,
        changed: bool,
    ) -> None:
        self.writes.append(WriteRecord(verb, rtype.plural, sub, ns, name, changed))

    def delete_object(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        preconditions: Mapping[str, Any] | None = None,
    ) -> Body:
        """DELETE semantics: finalizers hold the object with a deletionTimestamp; else it goes."""
        with self._store_lock:
            key = (rtype.key, namespace if rtype.namespaced else None, name)
            obj = self._objects.get(key)
            if obj is None:
                raise _not_found(rtype, name)
            for field_name in ("resourceVersion", "uid"):
                expected = (preconditions or {}).get(field_name)
                if expected and expected != obj["metadata"].get(field_name):
                    raise _status_error(
                        409, "Conflict", f"precondition failed: {field_name} mismatch for {name!r}"
                    )
            return copy.deepcopy(self._delete_locked(rtype, key, propagation))

    def list_objects(
        self,
        rtype: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Body], int]:
        matches_labels = parse_label_selector(label_selector)
        matches_fields = parse_field_selector(field_selector)
        with self._store_lock:
            items = [
                copy.deepcopy(obj)
                for (key, ns, _name), obj in self._objects.items()
                if key == rtype.key and (namespace is None or ns == namespace)
                if matches_labels(obj) and matches_fields(obj)
            ]
            return items, self._last_rv

    # ----------------------------------------------------------------- "the cluster" helpers

    def create(self, body: Body, *, keep_status: bool = True) -> Body:
        """Create an object as the cluster would (status kept unless told otherwise)."""
        rtype = self._type_for(body["apiVersion"], body["kind"])
        return self.create_object(
            rtype, body, body.get("metadata", {}).get("namespace"), keep_status=keep_status
        )

    def read(self, kind: str, namespace: str | None, name: str) -> Body | None:
        """The stored object (a copy), or None when absent."""
        rtype = self.resource_type(kind)
        with self._store_lock:
            obj = self._objects.get((rtype.key, namespace if rtype.namespaced else None, name))
            return copy.deepcopy(obj) if obj is not None else None

    def read_all(
        self, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[Body]:
        return self.list_objects(self.resource_type(kind), namespace, label_selector)[0]

    def merge_patch(self, kind: str, namespace: str | None, name: str, patch: Body) -> Body:
        """Merge-patch the main resource (status is ignored where it is a subresource)."""
        rtype = self.resource_type(kind)
        return self.update_object(
            rtype, namespace, name, lambda old: patching.merge_patch(old, patch)
        )

    def patch_status(self, kind: str, namespace: str | None, name: str, status: Body) -> Body:
        """Merge-patch the status, as a controller in the cluster would."""
        rtype = self.resource_type(kind)
        sub = "status" if rtype.status_subresource else None
        return self.update_object(
            rtype,
            namespace,
            name,
            lambda old: patching.merge_patch(old, {"status": status}),
            subresource=sub,
        )

    def request_delete(
        self, kind: str, namespace: str | None, name: str, propagation: str = "Background"
    ) -> Body:
        return self.delete_object(
            self.resource_type(kind), namespace, name, propagation=propagation
        )

    def events_about(self, namespace: str | None, name: str, kind: str | None = None) -> list[Body]:
        """Kubernetes Events (core/v1 and events.k8s.io/v1) whose subject is the named object."""
        found: list[Body] = []
        for rtype in self._types.values():
            if rtype.plural != "events":
                continue
            for event in self.list_objects(rtype, namespace)[0]:
                subject = event.get("involvedObject") or event.get("regarding") or {}
                if subject.get("name") == name and (kind is None or subject.get("kind") == kind):
                    found.append(event)
        return found

    def set_pod_log(
        self, namespace: str, pod: str, text: str, container: str | None = None
    ) -> None:
        """Replace what `GET .../pods/<pod>/log` answers."""
        with self._store_lock:
            self._pod_logs[(namespace, pod, container)] = text

    def append_pod_log(
        self, namespace: str, pod: str, text: str, container: str | None = None
    ) -> None:
        with self._store_lock:
            key = (namespace, pod, container)
            self._pod_logs[key] = self._pod_logs.get(key, "") + text

    def pod_log(
        self, namespace: str, pod: str, container: str | None = None, tail_lines: int | None = None
    ) -> str:
        with self._store_lock:
            text = self._pod_logs.get((namespace, pod, container))
            if text is None and container is not None:
                text = self._pod_logs.get((namespace, pod, None))
        lines = (text or "").splitlines(keepends=True)
        if tail_lines is not None:
            lines = lines[-tail_lines:] if tail_lines > 0 else []
        return "".join(lines)

    def terminate_container(
        self,
        namespace: str,
        pod: str,
        *,
        exit_code: int,
        message: str = "",
        reason: str | None = None,
        container: str | None = None,
    ) -> Body:
        """Finish a pod's container with an exit code and termination message (pod phase follows)."""
        current = self.read("pods", namespace, pod)
        if current is None:
            raise KeyError(f"pod {namespace}/{pod} does not exist")
        containers = current.get("spec", {}).get("containers") or [{"name": container or "main"}]
        names = [c.get("name") for c in containers]
        now = now_rfc3339()
        statuses = [
            {
                "name": cname,
                "ready": False,
                "started": False,
                "restartCount": 0,
                "imageID": "",
                "containerID": f"emulated://{namespace}/{pod}/{cname}",
                "image": next(
                    (c.get("image", "") for c in containers if c.get("name") == cname), ""
                ),
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                        "message": message,
                        "startedAt": now,
                        "finishedAt": now,
                    }
                },
            }
            for cname in names
            if container is None or cname == container
        ]
        phase = "Succeeded" if exit_code == 0 else "Failed"
        return self.patch_status(
            "pods", namespace, pod, {"phase": phase, "containerStatuses": statuses}
        )

    def set_job_finished(
        self, namespace: str, name: str, *, succeeded: bool, message: str = ""
    ) -> Body:
        """Mark a batch Job Complete or Failed, with the conditions a Job controller writes."""
        now = now_rfc3339()
        condition_type = "Complete" if succeeded else "Failed"
        conditions = [
            {"type": "SuccessCriteriaMet" if succeeded else "FailureTarget", "status": "True",
             "lastTransitionTime": now, "lastProbeTime": now, "reason": "", "message": message},
            {"type": condition_type, "status": "True", "lastTransitionTime": now,
             "lastProbeTime": now, "reason": "" if succeeded else "BackoffLimitExceeded", "message": message},
        ]  # fmt: skip
        status: Body = {
            "conditions": conditions,
            "active": 0,
            "completionTime" if succeeded else "failed": now,
        }
        if succeeded:
            status["succeeded"] = 1
        else:
            status["failed"] = 1
        return self.patch_status("jobs", namespace, name, status)

    def set_deployment_ready(self, namespace: str, name: str, ready: int | None = None) -> Body:
        """Report a Deployment's rollout as done (all replicas, or `ready` of them, available)."""
        current = self.read("deployments", namespace, name)
        if current is None:
            raise KeyError(f"deployment {namespace}/{name} does not exist")
        replicas = int(current.get("spec", {}).get("replicas", 1))
        ready = replicas if ready is None else ready
        return self.patch_status(
            "deployments", namespace, name,
            {"observedGeneration": current["metadata"]["generation"], "replicas": replicas,
             "updatedReplicas": ready, "readyReplicas": ready, "availableReplicas": ready,
             "unavailableReplicas": max(replicas - ready, 0)},
        )  # fmt: skip

    # ----------------------------------------------------------------- faults and counters

    def inject_fault(
        self,
        plural: str | None,
        status: int,
        *,
        count: int = 1,
        subresource: str | None = None,
        verbs: Iterable[str] = ("patch", "update"),
        name: str | None = None,
        message: str = "injected fault",
        retry_after_seconds: int | None = None,
    ) -> Fault:
        """Answer the next `count` matching requests with `status` (409/422/429/500...)."""
        fault = Fault(
            status=status, plural=plural, subresource=subresource, verbs=frozenset(verbs), name=name,
            remaining=count, message=message, retry_after_seconds=retry_after_seconds,
        )  # fmt: skip
        with self._store_lock:
            self._faults.append(fault)
        return fault

    def cut_watches(self, plural: str | None = None) -> int:
        """End the open watch streams (of one resource or all), as a server restart would."""
        with self._store_lock:
            cut = [w for w in self._watchers if plural is None or w.rtype.plural == plural]
        for watcher in cut:
            with contextlib.suppress(RuntimeError):
                watcher.loop.call_soon_threadsafe(watcher.queue.put_nowait, None)
        return len(cut)

    def remove_unseen(self, kind: str, namespace: str | None, name: str) -> bool:
        """Remove an object without any watch event, as a deletion would look to a client
        whose watch was cut off and resumed after the server's history of it was compacted
        (a relist then simply no longer shows it). False when there was no such object."""
        rtype = self.resource_type(kind)
        with self._store_lock:
            key = (rtype.key, namespace if rtype.namespaced else None, name)
            return self._objects.pop(key, None) is not None

    @property
    def open_watches(self) -> int:
        with self._store_lock:
            return len(self._watchers)

    def noop_writes(self, subresource: str | None = "*") -> list[WriteRecord]:
        """Writes that changed nothing ("*": any; None: the main resource; or e.g. "status")."""
        with self._store_lock:
            return [w for w in self.writes if not w.changed and subresource in ("*", w.subresource)]

    @property
    def noop_status_writes(self) -> int:
        return len(self.noop_writes("status"))

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        """Requests served so far, by verb (get/list/watch/create/update/patch/delete) and/or resource."""
        with self._store_lock:
            return sum(
                n for (v, r), n in self.request_counts.items()
                if (verb is None or v == verb) and (resource is None or r == resource)
            )  # fmt: skip

    def reset_counters(self) -> None:
        with self._store_lock:
            self.request_counts.clear()
            self.writes.clear()

    # ----------------------------------------------------------------- HTTP

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve one HTTP request; every failure becomes a Kubernetes `Status` answer."""
        await raw_request.read()
        try:
            request = await self._parse_request(raw_request)
            self._requests.append(request)
            return await self._handle(request)
        except Exception as exc:
            return await self._render_error(exc)

    async def _parse_request(self, raw_request: aiohttp.web.BaseRequest) -> kmock.Request:
        try:
            return await kmock.Request._parse(raw_request, id=len(self._requests))
        except ValueError:
            # kmock's path parser cannot split /api/v1/namespaces[/name]; ours does (in _handle).
            try:
                data = await raw_request.json()
            except ValueError:
                data = None
            return kmock.Request(
                id=len(self._requests), raw_request=raw_request, url=raw_request.url,
                method=raw_request.method, params=dict(raw_request.query),
                headers=dict(raw_request.headers), body=await raw_request.read(),
                text=await raw_request.text(), data=data,
            )  # fmt: skip

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if not isinstance(exc, kmock.KubernetesError):
            logger.exception("the embedded API server failed on a request")
            return await super()._render_error(exc)
        body = {
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": exc.status, "reason": exc.reason or "Unknown", "message": exc.message or "",
            "details": exc.details or {},
        }  # fmt: skip
        return aiohttp.web.json_response(body, status=exc.status)

    async def _serve_version(self, request: kmock.Request) -> Any:
        """APIResourceList of one group/version, with per-subresource verbs as the real server has."""
        assert request.resource is not None
        group, version = request.resource.group or "", request.resource.version or ""
        served = [
            rtype
            for rtype in self._types.values()
            if rtype.group == group and rtype.version == version
        ]
        if not served:
            raise _status_error(
                404, "NotFound", f"the server could not find the requested group {group}/{version}"
            )
        resources: list[Body] = []
        for rtype in served:
            common = {"singularName": "", "namespaced": rtype.namespaced, "kind": rtype.kind}
            resources.append({
                **common, "name": rtype.plural, "singularName": rtype.singular or rtype.kind.lower(),
                "verbs": list(rtype.verbs), "shortNames": list(rtype.short_names),
                "categories": list(rtype.categories),
            })  # fmt: skip
            for sub in rtype.subresources:
                verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
                resources.append({**common, "name": f"{rtype.plural}/{sub}", "verbs": verbs})
        return {"apiVersion": "v1", "kind": "APIResourceList",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}  # fmt: skip

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        parsed = parse_resource_path(raw.path if raw is not None else str(request.url.path))
        if len(self._requests) > self.keep_requests:
            del self._requests[: len(self._requests) - self.keep_requests // 2]
        if parsed is None:
            return await super()._handle(request)  # discovery, /version, errors
        rtype = self._types.get((parsed.group, parsed.version, parsed.plural))
        if rtype is None:
            raise _status_error(
                404,
                "NotFound",
                f"the server could not find the requested resource {parsed.plural!r}",
            )
        verb = self._verb(request.method.value, parsed, request.params)
        label = parsed.plural + (f"/{parsed.subresource}" if parsed.subresource else "")
        with self._store_lock:
            self.request_counts[(verb, label)] += 1
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.matches(verb, rtype, parsed.subresource, parsed.name)
                ),
                None,
            )
            if fault is not None:
                fault.remaining -= 1
                fault.served += 1
        if fault is not None:
            return self._fault_response(fault)
        if verb == "watch":
            return await self._serve_watch(request, rtype, parsed)
        payload, status = self._serve(request, rtype, parsed, verb)
        if isinstance(payload, str):
            return aiohttp.web.Response(text=payload, status=status, content_type="text/plain")
        return aiohttp.web.json_response(payload, status=status)

    @staticmethod
    def _verb(method: str, parsed: _ParsedPath, params: Mapping[str, str]) -> str:
        if method == "GET":
            if params.get("watch") in ("true", "1"):
                return "watch"
            return "get" if parsed.name else "list"
        if method == "POST":
            return "create"
        if method == "PUT":
            return "update"
        if method == "PATCH":
            return "patch"
        if method == "DELETE":
            return "delete" if parsed.name else "deletecollection"
        return method.lower()

    @staticmethod
    def _fault_response(fault: Fault) -> aiohttp.web.StreamResponse:
        reasons = {
            409: "Conflict",
            422: "Invalid",
            429: "TooManyRequests",
            500: "InternalError",
            503: "ServiceUnavailable",
        }
        details: Body = {}
        headers: dict[str, str] = {}
        if fault.retry_after_seconds is not None:
            details["retryAfterSeconds"] = fault.retry_after_seconds
            headers["Retry-After"] = str(fault.retry_after_seconds)
        body = {
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": fault.status, "reason": fault.reason or reasons.get(fault.status, "Unknown"),
            "message": fault.message, "details": details,
        }  # fmt: skip
        return aiohttp.web.json_response(body, status=fault.status, headers=headers)

    def _serve(
        self, request: kmock.Request, rtype: ResourceType, parsed: _ParsedPath, verb: str
    ) -> tuple[Any, int]:
        namespace = parsed.namespace if rtype.namespaced else None
        params = request.params
        if parsed.subresource == "log" and rtype.plural == "pods" and verb == "get":
            if self.read("pods", namespace, parsed.name or "") is None:
                raise _not_found(rtype, parsed.name or "")
            tail = params.get("tailLines")
            return self.pod_log(
                namespace or "",
                parsed.name or "",
                params.get("container"),
                int(tail) if tail else None,
            ), 200
        if parsed.subresource not in (None, "status"):
            raise _status_error(
                404, "NotFound", f"the subresource {parsed.subresource!r} is not served"
            )
        if verb == "list":
            try:
                items, rv = self.list_objects(
                    rtype, namespace, params.get("labelSelector"), params.get("fieldSelector")
                )
            except SelectorError as exc:
                raise _status_error(400, "BadRequest", str(exc)) from exc
            return {"apiVersion": rtype.api_version, "kind": f"{rtype.kind}List",
                    "metadata": {"resourceVersion": str(rv)}, "items": items}, 200  # fmt: skip
        if verb == "get":
            obj = self.get_by_type(rtype, namespace, parsed.name or "")
            if obj is None:
                raise _not_found(rtype, parsed.name or "")
            return obj, 200
        data = request.data
        if verb == "create":
            if not isinstance(data, dict):
                raise _status_error(400, "BadRequest", "the request body must be a JSON object")
            return self.create_object(rtype, data, parsed.namespace), 201
        if verb == "update":
            if not isinstance(data, dict):
                raise _status_error(400, "BadRequest", "the request body must be a JSON object")
            body_name = (data.get("metadata") or {}).get("name")
            if body_name and body_name != parsed.name:
                raise _status_error(
                    400, "BadRequest", "the name of the object does not match the URL"
                )
            return self.update_object(
                rtype, namespace, parsed.name or "", lambda _old: copy.deepcopy(data),
                subresource=parsed.subresource, verb="update",
            ), 200  # fmt: skip
        if verb == "patch":
            content_type = request.headers.get("Content-Type", patching.MERGE_PATCH)
            if content_type.startswith(patching.APPLY_PATCH):
                raise _status_error(
                    415, "UnsupportedMediaType", "server-side apply is not supported here"
                )
            return self.update_object(
                rtype, namespace, parsed.name or "",
                lambda old: patching.apply_patch(old, data, content_type),
                subresource=parsed.subresource, verb="patch",
            ), 200  # fmt: skip
        if verb == "delete":
            options = data if isinstance(data, dict) else {}
            propagation = (
                options.get("propagationPolicy") or params.get("propagationPolicy") or "Background"
            )
            return self.delete_object(
                rtype, namespace, parsed.name or "",
                propagation=propagation, preconditions=options.get("preconditions"),
            ), 200  # fmt: skip
        if verb == "deletecollection":
            items, _rv = self.list_objects(
                rtype, namespace, params.get("labelSelector"), params.get("fieldSelector")
            )
            deleted = []
            for item in items:
                with contextlib.suppress(kmock.KubernetesError):
                    meta = item["metadata"]
                    deleted.append(self.delete_object(rtype, meta.get("namespace"), meta["name"]))
            return {"apiVersion": rtype.api_version, "kind": f"{rtype.kind}List",
                    "metadata": {}, "items": deleted}, 200  # fmt: skip
        raise _status_error(405, "MethodNotAllowed", f"{verb} is not supported")

    def get_by_type(self, rtype: ResourceType, namespace: str | None, name: str) -> Body | None:
        with self._store_lock:
            obj = self._objects.get((rtype.key, namespace if rtype.namespaced else None, name))
            return copy.deepcopy(obj) if obj is not None else None

    async def _serve_watch(
        self, request: kmock.Request, rtype: ResourceType, parsed: _ParsedPath
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        try:
            labels = parse_label_selector(params.get("labelSelector"))
            fields = parse_field_selector(params.get("fieldSelector"))
        except SelectorError as exc:
            raise _status_error(400, "BadRequest", str(exc)) from exc
        by_name = parse_field_selector(f"metadata.name={parsed.name}") if parsed.name else fields
        namespace = parsed.namespace if rtype.namespaced else None

        def matches(obj: Mapping[str, Any]) -> bool:
            return labels(obj) and fields(obj) and by_name(obj)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Body] | None] = asyncio.Queue()
        initial: list[Body] = []
        gone = False
        with self._store_lock:
            since_text = params.get("resourceVersion")
            if since_text and since_text != "0":
                since = int(since_text)
                if since < self._compacted_rv.get(rtype.key, 0):
                    gone = True
                for rv, event, previous in self._events.get(rtype.key, []):
                    obj = event["object"]
                    in_namespace = (
                        namespace is None or obj["metadata"].get("namespace") == namespace
                    )
                    if rv <= since or not in_namespace:
                        continue
                    # As a live watch would have seen it: entering the selection is ADDED,
                    # leaving it DELETED (a label change on a resumed watch included).
                    seen = _selected_event_type(event["type"], matches(obj), previous, matches)
                    if seen is not None:
                        initial.append({"type": seen, "object": obj})
            else:
                for (key, ns, _name), obj in self._objects.items():
                    if key == rtype.key and (namespace is None or ns == namespace) and matches(obj):
                        initial.append({"type": "ADDED", "object": copy.deepcopy(obj)})
            watcher = _Watcher(rtype, namespace, matches, queue, loop, since=self._last_rv)
            if not gone:
                self._watchers.append(watcher)

        assert request._raw_request is not None
        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )
        await response.prepare(request._raw_request)
        try:
            if gone:
                await self._write_event(response, {"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410, "reason": "Expired",
                    "message": f"too old resource version: {params.get('resourceVersion')}"}})  # fmt: skip
                return response
            for event in initial:
                await self._write_event(response, event)
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            deadline = loop.time() + timeout if timeout else None
            while True:
                remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if item is None:
                    break
                rv, event = item
                if rv > watcher.since:
                    await self._write_event(response, event)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with self._store_lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    @staticmethod
    async def _write_event(response: aiohttp.web.StreamResponse, event: Body) -> None:
        await response.write(json.dumps(event).encode() + b"\n")

    # ----------------------------------------------------------------- serving

    def objects(self) -> Iterator[Body]:
        """A snapshot of every stored object (copies)."""
        with self._store_lock:
            return iter([copy.deepcopy(obj) for obj in self._objects.values()])


@dataclass
class RunningServer:
    """An emulator served over HTTP from a background thread with its own event loop."""

    api: Emulator
    url: str = ""
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> RunningServer:
        self._thread = threading.Thread(
            target=self._main, name="kubernetes-api-emulator", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the embedded Kubernetes API did not start in time")
        if self._error is not None:
            raise RuntimeError("the embedded Kubernetes API failed to start") from self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.api.loop = self._loop
        async with self.api, kmock.Server(self.api, host="127.0.0.1") as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            self.api.cut_watches()
            await asyncio.sleep(0)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(api: Emulator) -> RunningServer:
    """Start serving `api` on 127.0.0.1 at a random port; use as a context manager."""
    return RunningServer(api).start()
