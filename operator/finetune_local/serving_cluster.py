"""Serving side of the emulated cluster (tests, embedded demo): Deployment controller + kubelet.

The embedded API (``finetune_local.Emulator``) stores objects but runs no
controllers. ``ServingCluster`` plays the Deployment controller and the kubelet for
Deployments in one namespace: for each pod template it starts one real
``ReferenceServer`` (the vLLM-compatible server) per replica, configured from the vLLM
container's command line, writes the Pod objects (Ready or not, ``podIP`` 127.0.0.1, the
server's URL in the ``finetune.dev/endpoint`` annotation), removes old pods once the new
ones are Ready (maxUnavailable 0), and writes the Deployment's status like the real
controller, including ``ProgressDeadlineExceeded`` after ``spec.progressDeadlineSeconds``.

Paths of the vLLM container are translated to local folders: a mount of a PVC volume
maps to ``<pvc_root>/<claimName>/<subPath>``; any other absolute path is used as is.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from finetune_operator.serving import vllm_args, vllm_server
from finetune_operator.serving.serving_config import ENDPOINT_ANNOTATION

from .emulator import Emulator
from .vllm_reference import (
    Generation,
    Generator,
    ReferenceConfig,
    ReferenceServer,
    ServerRefusedToStart,
)

# (deployment name, pod template) -> ReferenceConfig overrides (error_rate, added_latency_seconds...)
Behavior = Callable[[str, dict[str, Any]], dict[str, Any]]
T = TypeVar("T")


POD_TEMPLATE_HASH = "pod-template-hash"
API_SERVER_COMMAND = ["python", "-m", "vllm.entrypoints.openai.api_server"]


def _keys(obj: dict[str, Any]) -> list[str]:
    return [*(obj.get("data") or {}), *(obj.get("stringData") or {})]


def _data_value(obj: dict[str, Any], key: str, secret: bool) -> str | None:
    """A Secret's (base64 ``data``, or ``stringData``) or a ConfigMap's value of ``key``."""
    raw = (obj.get("data") or {}).get(key)
    if raw is not None:
        return base64.b64decode(raw).decode() if secret else str(raw)
    plain = (obj.get("stringData") or {}).get(key)
    return None if plain is None else str(plain)


def _server_command(container: dict[str, Any]) -> list[str]:
    """The server's command line as vLLM runs it, whatever the form (``sh -c``, the vLLM
    image's own entry point given args only): vLLM's argv behind its entry point."""
    located = vllm_args.locate(container)
    assert located is not None
    entry = ["vllm", "serve"] if located.serve else API_SERVER_COMMAND
    return [*entry, *vllm_args.server_argv(container)]


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:8]


@dataclass
class SimPod:
    name: str
    deployment: str
    hash: str
    server: ReferenceServer | None
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    restarts: int = 0
    pending: bool = False  # scheduled nowhere yet (no node): not Ready, not a failed start


class ServingCluster:
    def __init__(
        self,
        api: Emulator,
        namespace: str,
        pvc_root: Path,
        behavior: Behavior | None = None,
        interval: float = 0.05,
        generator: Generator | None = None,
        generation: Generation = "0.11",
    ) -> None:
        self.api = api
        self.generation = generation  # which vLLM generation the servers imitate
        self.namespace = namespace
        self.pvc_root = pvc_root
        self.behavior = behavior or (lambda _dep, _tpl: {})
        self.interval = interval
        self.generator = generator  # answers chat requests (default: the echo generator)
        self.pods: dict[str, SimPod] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="serving-cluster"
        )
        self._task: concurrent.futures.Future[None] | None = None
        self._counter = 0
        self.errors: list[BaseException] = []
        self._held: set[str] = set()  # Deployments whose new pods stay Pending

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> ServingCluster:
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if self.errors:
            raise self.errors[0]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the cluster's loop (where the servers live)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _stop_all(self) -> None:
        for pod in list(self.pods.values()):
            if pod.server is not None:
                await pod.server.stop()
        self.pods.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # surfaced when the block ends
                self.errors.append(exc)
                raise
            await asyncio.sleep(self.interval)

    # ------------------------------------------------------------ test controls

    def servers(self, deployment: str) -> list[ReferenceServer]:
        return [
            p.server
            for p in self.pods.values()
            if p.deployment == deployment and p.server is not None
        ]

    def restart_pod(self, pod_name: str) -> None:
        """The container restarts: a fresh server (static adapters only) on a new port."""
        self.call(self._restart(pod_name))

    async def _restart(self, pod_name: str) -> None:
        pod = self.pods[pod_name]
        assert pod.server is not None
        config = pod.server.config
        await pod.server.crash()
        pod.server = ReferenceServer(config, self.generator)
        await pod.server.start()
        pod.restarts += 1
        self.api.merge_patch(
            "pods", self.namespace, pod_name,
            {"metadata": {"annotations": {ENDPOINT_ANNOTATION: pod.server.endpoint}}},
        )  # fmt: skip

    def lose_pod(self, pod_name: str) -> None:
        """The pod is gone (its node failed, or it was evicted); the Deployment replaces it."""
        self.call(self._remove_pod(self.pods[pod_name]))

    def hold_new_pods(self, deployment: str) -> None:
        """Pods the Deployment creates from now on stay Pending (no node has room)."""
        self._held.add(deployment)

    def release_pods(self, deployment: str) -> None:
        """Room again: Pending pods of the Deployment are replaced by pods that start."""
        self._held.discard(deployment)
        for pod in [p for p in self.pods.values() if p.deployment == deployment and p.pending]:
            self.call(self._remove_pod(pod))

    # ------------------------------------------------------------ controller

    def _local_path(self, pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> str:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec.get("volumes") or []
            if "persistentVolumeClaim" in v
        }
        for mount in container.get("volumeMounts") or []:
            base = str(mount["mountPath"]).rstrip("/")
            if mount.get("name") in claims and (path == base or path.startswith(base + "/")):
                local = self.pvc_root / claims[mount["name"]] / str(mount.get("subPath") or "")
                rest = path[len(base) :].lstrip("/")
                return str(local / rest) if rest else str(local)
        return path

    def _container_env(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's environment as the kubelet gives it: ``envFrom`` first, then
        ``env`` (values, Secret and ConfigMap keys), the last entry of a name winning."""
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            for kind, ref_key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                ref = src.get(ref_key)
                if ref is None:
                    continue
                obj = self.api.read(kind, self.namespace, str(ref.get("name")))
                if obj is None:
                    if not ref.get("optional"):
                        raise ServerRefusedToStart(f'{kind[:-1]} "{ref.get("name")}" not found')
                    continue
                prefix = str(src.get("prefix") or "")
                for key in _keys(obj):
                    value = _data_value(obj, key, kind == "secrets")
                    if value is not None:
                        env[prefix + key] = value
        for var in container.get("env") or []:
            name = str(var.get("name"))
            if "value" in var:
                env[name] = str(var.get("value") or "")
                continue
            value_from = var.get("valueFrom") or {}
            kind, ref = (
                ("secrets", value_from["secretKeyRef"])
                if "secretKeyRef" in value_from
                else ("configmaps", value_from.get("configMapKeyRef") or {})
            )
            obj = self.api.read(kind, self.namespace, str(ref.get("name"))) if ref else None
            if obj is None:
                if ref and not ref.get("optional"):
                    raise ServerRefusedToStart(
                        f'{kind[:-1]} "{ref.get("name")}" not found (env {name})'
                    )  # the kubelet's CreateContainerConfigError
                continue
            value = _data_value(obj, str(ref.get("key")), kind == "secrets")
            if value is not None:
                env[name] = value
        return env

    def _server_config(self, dep_name: str, template: dict[str, Any]) -> ReferenceConfig:
        pod_spec = template.get("spec") or {}
        index, _ = vllm_server.find_vllm_container(pod_spec)
        if index is None:
            raise ServerRefusedToStart("no vLLM container")
        container = pod_spec["containers"][index]
        config = ReferenceConfig.from_command_line(
            _server_command(container), self._container_env(container), generation=self.generation
        )
        config.lora_modules = {
            name: self._local_path(pod_spec, container, path)
            for name, path in config.lora_modules.items()
        }
        for key, value in self.behavior(dep_name, template).items():
            setattr(config, key, value)
        return config

    async def _start_pod(self, dep: dict[str, Any], h: str) -> SimPod:
        name = dep["metadata"]["name"]
        template = dep["spec"]["template"]
        self._counter += 1
        pod_name = f"{name}-{h[:6]}-{self._counter}"
        server: ReferenceServer | None = None
        error: str | None = None
        pending = name in self._held
        if not pending:
            try:
                server = ReferenceServer(self._server_config(name, template), self.generator)
                await server.start()
            except ServerRefusedToStart as exc:
                server, error = None, str(exc)
        tpl_meta = template.get("metadata") or {}
        annotations = dict(tpl_meta.get("annotations") or {})
        if server is not None:
            annotations[ENDPOINT_ANNOTATION] = server.endpoint
        ready = server is not None
        status: dict[str, Any] = {
            "phase": "Pending" if pending else "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        if not pending:
            status["podIP"] = "127.0.0.1"
        if error:
            status["containerStatuses"] = [
                {"name": "vllm", "ready": False, "restartCount": 3,
                 "state": {"waiting": {"reason": "CrashLoopBackOff", "message": error}}}
            ]  # fmt: skip
        self.api.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": self.namespace,
                    "labels": {**(tpl_meta.get("labels") or {}), POD_TEMPLATE_HASH: h[:10]},
                    "annotations": annotations,
                    # As the Deployment controller does: the pod belongs to the ReplicaSet
                    # of its template, named after the Deployment and the template's hash.
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "ReplicaSet",
                            "name": f"{name}-{h[:10]}",
                            "uid": f"{dep['metadata'].get('uid', '')}-{h[:10]}",
                            "controller": True,
                        }
                    ],
                },
                "spec": template.get("spec") or {},
                "status": status,
            },
            keep_status=True,
        )
        pod = SimPod(pod_name, name, h, server, error, pending=pending)
        self.pods[pod_name] = pod
        return pod

    async def _remove_pod(self, pod: SimPod) -> None:
        if pod.server is not None:
            await pod.server.stop()
        self.pods.pop(pod.name, None)
        with contextlib.suppress(Exception):
            self.api.request_delete("pods", self.namespace, pod.name)

    async def _sync(self) -> None:
        deployments = {
            d["metadata"]["name"]: d for d in self.api.read_all("deployments", self.namespace)
        }
        for pod in list(self.pods.values()):
            if pod.deployment not in deployments:
                await self._remove_pod(pod)
        for name, dep in deployments.items():
            await self._sync_deployment(name, dep)

    async def _sync_deployment(self, name: str, dep: dict[str, Any]) -> None:
        spec = dep["spec"]
        replicas = int(spec.get("replicas", 1))
        h = template_hash(spec["template"])
        mine = [p for p in self.pods.values() if p.deployment == name]
        new = [p for p in mine if p.hash == h]
        old = [p for p in mine if p.hash != h]
        while len(new) < replicas:
            new.append(await self._start_pod(dep, h))
        while len(new) > replicas:
            await self._remove_pod(new.pop())
        new_ready = [p for p in new if p.server is not None]
        if len(new_ready) == replicas:
            for pod in old:  # the new ReplicaSet is fully available: scale the old one down
                await self._remove_pod(pod)
            old = []
        old_ready = [p for p in old if p.server is not None]
        available = len(new_ready) + len(old_ready)
        conditions = []
        deadline = spec.get("progressDeadlineSeconds")
        # A pod that failed to start counts against the progress deadline; one waiting for a
        # node does not (as after a completed rollout, where a lost pod's replacement does not
        # flip the Deployment's Progressing condition).
        stuck = [p for p in new if p.server is None and not p.pending]
        if (
            stuck
            and deadline is not None
            and time.monotonic() - min(p.created for p in stuck) > float(deadline)
        ):
            conditions.append({
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": f'ReplicaSet "{name}-{h[:6]}" has timed out progressing: {stuck[0].error}',
            })  # fmt: skip
        status = {
            "observedGeneration": dep["metadata"].get("generation", 1),
            "replicas": len(new) + len(old),
            "updatedReplicas": len(new),
            "readyReplicas": available,
            "availableReplicas": available,
            "unavailableReplicas": max(0, replicas - available),
            "conditions": conditions,
        }
        current = dep.get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            with contextlib.suppress(Exception):  # deleted meanwhile
                self.api.patch_status("deployments", self.namespace, name, status)
