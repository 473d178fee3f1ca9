"""A local kubelet + Job controller + Deployment controller for the embedded API.

The embedded API (:class:`~finetune_local.Emulator`) stores objects but runs
nothing. :class:`LocalExecutor` plays the rest of the cluster on this machine:

- **Jobs** (batch/v1): for a Job that is neither suspended nor finished it creates a Pod
  (labels ``job-name``/``batch.kubernetes.io/job-name``/``controller-uid``, the template's
  labels, an ownerReference to the Job), runs the init containers and then the main
  container as local subprocesses, streams their output into the pod log, and writes the
  container's terminated state (exit code, reason, termination message) and the Job's
  status (active/succeeded/failed, Complete/Failed conditions, start/completion time)
  the way the Job controller does, honouring ``backoffLimit``, ``podFailurePolicy``,
  ``activeDeadlineSeconds``, ``suspend`` and deletion.
- **Deployments** running vLLM: :class:`LocalServing` extends the serving simulator
  (:class:`~finetune_local.serving_cluster.ServingCluster`) with a real
  generator, so each replica is a vLLM-compatible server answering with the tiny base
  model and its LoRA adapters.

Volumes become local folders: a PVC claim ``X`` is ``<workdir>/pvc/X``; ConfigMap and
Secret volumes are files written from the stored objects; emptyDir is a fresh folder.
Every mountPath prefix in args, env values and mounted config files is rewritten to the
local folder, and so is the container's ``terminationMessagePath``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from finetune_operator.domain.times import now_rfc3339, parse_rfc3339
from finetune_operator.serving import vllm_args

from .emulator import Emulator
from .generation import TransformersGenerator
from .localrun import trainer_root
from .serving_cluster import ServingCluster, SimPod

log = logging.getLogger(__name__)

Body = dict[str, Any]

# Console scripts of this project's images, run from the current interpreter locally.
ENTRYPOINT_MODULES = {
    "finetune-trainer": "finetune_trainer.cli",
    "finetune-operator": "finetune_operator.cli",
}
# The folder holding finetune_operator, so subprocesses import the same code as this process.
PACKAGE_ROOTS = (str(Path(__file__).resolve().parents[1]),)
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class ContainerNotRunnable(RuntimeError):
    """The container's entrypoint cannot be run on this machine."""


def _parse_time(value: str | None) -> float | None:
    moment = parse_rfc3339(value)
    return moment.timestamp() if moment else None


# ---------------------------------------------------------------- pure helpers


def rewrite_path(value: str, mapping: Sequence[tuple[str, str]]) -> str:
    """Rewrite a container path (or ``--flag=path``) to its local folder; others unchanged.

    ``mapping`` holds (container prefix, local path) pairs; the longest prefix wins and a
    prefix matches whole path components only (``/tmp`` maps ``/tmp/x``, not ``/tmpx``).
    """
    flag, sep, rest = value.partition("=")
    if sep and flag.startswith("-") and rest.startswith("/"):
        return f"{flag}={rewrite_path(rest, mapping)}"
    for prefix, local in sorted(mapping, key=lambda item: -len(item[0])):
        if value == prefix:
            return local
        if value.startswith(prefix.rstrip("/") + "/"):
            return local.rstrip("/") + "/" + value[len(prefix.rstrip("/")) + 1 :]
    return value


def rewrite_structure(value: Any, mapping: Sequence[tuple[str, str]]) -> Any:
    """Rewrite every string in a parsed YAML/JSON document."""
    if isinstance(value, str):
        return rewrite_path(value, mapping)
    if isinstance(value, list):
        return [rewrite_structure(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: rewrite_structure(v, mapping) for k, v in value.items()}
    return value


def rewrite_file_text(name: str, text: str, mapping: Sequence[tuple[str, str]]) -> str:
    """A mounted config file with its container paths rewritten (YAML/JSON parsed)."""
    if name.endswith(".json"):
        with contextlib.suppress(ValueError):
            return json.dumps(rewrite_structure(json.loads(text), mapping), indent=2)
    if name.endswith((".yaml", ".yml")):
        with contextlib.suppress(yaml.YAMLError):
            return yaml.safe_dump(rewrite_structure(yaml.safe_load(text), mapping), sort_keys=True)
    for prefix, local in sorted(mapping, key=lambda item: -len(item[0])):
        text = text.replace(prefix.rstrip("/") + "/", local.rstrip("/") + "/")
    return text


def local_command(container: Mapping[str, Any], python: str = sys.executable) -> list[str]:
    """The command line that runs a container's entrypoint on this machine."""
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if not command:
        image = str(container.get("image") or "")
        entry = next((e for e in ENTRYPOINT_MODULES if e in image), None)
        if entry is None:
            raise ContainerNotRunnable(
                f"container {container.get('name')!r}: image {image!r} has no command and no "
                "known entrypoint; set `command` for local runs"
            )
        command = [entry]
    head = command[0]
    if head in ENTRYPOINT_MODULES:
        return [python, "-m", ENTRYPOINT_MODULES[head], *command[1:], *args]
    if Path(head).name in ("python", "python3"):
        return [python, *command[1:], *args]
    if shutil.which(head) is None:
        raise ContainerNotRunnable(
            f"container {container.get('name')!r}: command {head!r} is not available on this machine"
        )
    return [*command, *args]


def container_command(
    container: Mapping[str, Any], mapping: Sequence[tuple[str, str]], python: str = sys.executable
) -> list[str]:
    """The local command line with the container's own paths rewritten to local folders.

    Only what the container declares is rewritten: the local interpreter may itself live
    under a folder a volume is mounted at in the pod (a checkout under /tmp, say).
    """
    local = {
        **container,
        "command": [rewrite_path(str(c), mapping) for c in container.get("command") or []],
        "args": [rewrite_path(str(a), mapping) for a in container.get("args") or []],
    }
    return local_command(local, python)


def pod_name_for(job_name: str) -> str:
    """``<job>-<5 random chars>`` like the Job controller's generateName."""
    prefix = job_name[:57].rstrip("-.")
    return f"{prefix}-{''.join(random.choices(_NAME_ALPHABET, k=5))}"


def failure_policy_action(job: Mapping[str, Any], container: str, exit_code: int) -> str | None:
    """The podFailurePolicy action (FailJob, Ignore, Count) that an exit code triggers."""
    policy = (job.get("spec") or {}).get("podFailurePolicy") or {}
    for rule in policy.get("rules") or []:
        codes = rule.get("onExitCodes")
        if not codes:
            continue
        if codes.get("containerName") not in (None, container):
            continue
        values = [int(v) for v in codes.get("values") or []]
        matched = exit_code in values
        if codes.get("operator") == "NotIn":
            matched = not matched and exit_code != 0
        if matched:
            return str(rule.get("action"))
    return None


def job_conditions(
    current: Sequence[Mapping[str, Any]], type_: str, status: str, reason: str, message: str
) -> list[Body]:
    """The Job's conditions with one of them set (others kept as they are)."""
    now = now_rfc3339()
    result: list[Body] = []
    found = False
    for cond in current:
        if cond.get("type") == type_:
            found = True
            changed = cond.get("status") != status
            result.append({
                **cond, "status": status, "reason": reason, "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now if changed else cond.get("lastTransitionTime", now),
            })  # fmt: skip
        else:
            result.append(dict(cond))
    if not found:
        result.append({"type": type_, "status": status, "reason": reason, "message": message,
                       "lastProbeTime": now, "lastTransitionTime": now})  # fmt: skip
    return result


def is_finished(job: Mapping[str, Any]) -> bool:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return True
    return False


# ---------------------------------------------------------------- pods


@dataclass
class PodRun:
    """One pod of a Job, running (or run) as local processes."""

    namespace: str
    job_name: str
    job_uid: str
    name: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    stop_reason: str | None = None  # set when the executor ends the pod (suspend, deadline...)
    exit_code: int | None = None
    main_container: str = ""
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class JobState:
    uid: str
    failed: int = 0
    succeeded: int = 0
    start_time: str | None = None
    pod: PodRun | None = None


class LocalExecutor:
    """Runs the Jobs and vLLM Deployments stored in the embedded API on this machine.

    Use as a context manager. ``workdir`` holds the PVCs (``pvc/<claim>``) and one folder
    per pod (``pods/<namespace>/<pod>``: config volumes, emptyDirs, termination logs).
    """

    def __init__(
        self,
        api: Emulator,
        workdir: str | Path,
        *,
        namespace: str = "default",
        serve_deployments: bool = True,
        python: str = sys.executable,
        interval: float = 0.2,
        grace_seconds: float = 10.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.api = api
        self.workdir = Path(workdir).resolve()
        self.namespace = namespace
        self.python = python
        self.interval = interval
        self.grace_seconds = grace_seconds
        self.extra_env = dict(extra_env or {})
        self.jobs: dict[str, JobState] = {}
        self.errors: list[BaseException] = []
        self.serving: LocalServing | None = (
            LocalServing(api, namespace, self.workdir / "pvc") if serve_deployments else None
        )
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="local-executor", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalExecutor:
        (self.workdir / "pvc").mkdir(parents=True, exist_ok=True)
        if self.serving is not None:
            self.serving.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            runs = [s.pod for s in self.jobs.values() if s.pod is not None]
        for run in runs:
            self._terminate(run, "ExecutorStopped")
        for run in runs:
            run.done.wait(self.grace_seconds + 5)
        if self.serving is not None:
            self.serving.__exit__(None, None, None)

    def pvc_path(self, claim: str) -> Path:
        return self.workdir / "pvc" / claim

    # ------------------------------------------------------------ the Job controller

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_jobs()
            except Exception as exc:  # keep going; surfaced to whoever inspects errors
                log.exception("local executor: sync failed")
                self.errors.append(exc)
            self._stop.wait(self.interval)

    def sync_jobs(self) -> None:
        """One pass of the Job controller over every Job of the namespace."""
        with self._lock:
            # Read under the lock a finishing pod records its Job's outcome with: a snapshot
            # taken before would show the Job unfinished with its pod done, and start a second.
            jobs = {j["metadata"]["uid"]: j for j in self.api.read_all("jobs", self.namespace)}
            for uid in list(self.jobs):
                if uid not in jobs:  # the Job was deleted: its pod goes with it
                    state = self.jobs.pop(uid)
                    if state.pod is not None:
                        self._terminate(state.pod, "JobDeleted")
            for uid, job in jobs.items():
                self._sync_job(job, self.jobs.setdefault(uid, JobState(uid=uid)))

    def _sync_job(self, job: Body, state: JobState) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        if meta.get("deletionTimestamp") or is_finished(job):
            if state.pod is not None and not state.pod.done.is_set():
                self._terminate(
                    state.pod, "JobDeleted" if meta.get("deletionTimestamp") else "JobFinished"
                )
            return
        running = state.pod is not None and not state.pod.done.is_set()
        if (
            running
            and state.pod is not None
            and state.pod.stop_reason is None
            and self.api.read("pods", self.namespace, state.pod.name) is None
        ):
            # Someone deleted the pod (eviction, kubectl delete): its process ends and the
            # Job counts a failed pod, then makes a new one while backoffLimit allows.
            self._terminate(state.pod, "PodDeleted")
            return
        if spec.get("suspend"):
            if running and state.pod is not None:
                self._terminate(state.pod, "JobSuspended")
            elif not running:
                self._set_suspended(job, state, True)
            return
        deadline = spec.get("activeDeadlineSeconds")
        started = _parse_time((job.get("status") or {}).get("startTime"))
        if running and deadline is not None and started is not None:
            if time.time() - started > float(deadline) and state.pod is not None:
                self._terminate(state.pod, "DeadlineExceeded")
            return
        if not running:
            self._start_pod(job, state)

    def _set_suspended(self, job: Body, state: JobState, suspended: bool) -> None:
        status = job.get("status") or {}
        conditions = status.get("conditions") or []
        current = next((c for c in conditions if c.get("type") == "Suspended"), None)
        if suspended and (current is None or current.get("status") != "True"):
            self.api.patch_status("jobs", self.namespace, job["metadata"]["name"], {
                "active": 0, "ready": 0, "startTime": None,
                "conditions": job_conditions(conditions, "Suspended", "True", "JobSuspended", "Job suspended"),
            })  # fmt: skip
        elif not suspended and current is not None and current.get("status") == "True":
            self.api.patch_status("jobs", self.namespace, job["metadata"]["name"], {
                "conditions": job_conditions(conditions, "Suspended", "False", "JobResumed", "Job resumed"),
            })  # fmt: skip

    def _start_pod(self, job: Body, state: JobState) -> None:
        meta = job["metadata"]
        name = meta["name"]
        self._set_suspended(job, state, False)
        template = (job.get("spec") or {}).get("template") or {}
        pod_name = pod_name_for(name)
        labels = {
            **((template.get("metadata") or {}).get("labels") or {}),
            "job-name": name,
            "batch.kubernetes.io/job-name": name,
            "controller-uid": meta["uid"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
        }
        pod_body: Body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": dict((template.get("metadata") or {}).get("annotations") or {}),
                "ownerReferences": [{
                    "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": meta["uid"],
                    "controller": True, "blockOwnerDeletion": True,
                }],
            },
            "spec": {**(template.get("spec") or {}), "nodeName": "local"},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]},
        }  # fmt: skip
        self.api.create(pod_body, keep_status=True)
        now = now_rfc3339()
        state.start_time = (job.get("status") or {}).get("startTime") or now
        self.api.patch_status("jobs", self.namespace, name, {
            "active": 1, "ready": 0, "startTime": state.start_time,
            "failed": state.failed or None, "succeeded": state.succeeded or None,
        })  # fmt: skip
        run = PodRun(
            namespace=self.namespace,
            job_name=name,
            job_uid=meta["uid"],
            name=pod_name,
            directory=self.workdir / "pods" / self.namespace / pod_name,
        )
        state.pod = run
        run.thread = threading.Thread(
            target=self._run_pod, args=(run, pod_body["spec"]), name=f"pod-{pod_name}", daemon=True
        )
        run.thread.start()

    # ------------------------------------------------------------ the kubelet

    def _volume_paths(self, run: PodRun, pod_spec: Body) -> dict[str, Path]:
        """Each volume of the pod as a local folder (ConfigMap/Secret files written)."""
        local: dict[str, Path] = {}
        for volume in pod_spec.get("volumes") or []:
            vname = volume["name"]
            if "persistentVolumeClaim" in volume:
                path = self.pvc_path(volume["persistentVolumeClaim"]["claimName"])
            else:
                path = run.directory / "volumes" / vname
            path.mkdir(parents=True, exist_ok=True)
            local[vname] = path
        return local

    def _write_config_volumes(
        self, pod_spec: Body, local: Mapping[str, Path], mapping: Sequence[tuple[str, str]]
    ) -> None:
        for volume in pod_spec.get("volumes") or []:
            files: dict[str, str] = {}
            if "configMap" in volume:
                source = volume["configMap"]
                cm = self.api.read("configmaps", self.namespace, source["name"])
                if cm is None:
                    raise ContainerNotRunnable(f'configmap "{source["name"]}" not found')
                files = dict(cm.get("data") or {})
            elif "secret" in volume:
                source = volume["secret"]
                secret = self.api.read("secrets", self.namespace, source["secretName"])
                if secret is None:
                    raise ContainerNotRunnable(f'secret "{source["secretName"]}" not found')
                files = {
                    k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()
                }
                files.update(secret.get("stringData") or {})
            else:
                continue
            items = source.get("items")
            if items:
                files = {i["path"]: files[i["key"]] for i in items if i["key"] in files}
            for fname, text in files.items():
                target = local[volume["name"]] / fname
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(rewrite_file_text(fname, text, mapping), encoding="utf-8")

    def _path_mapping(
        self, run: PodRun, pod_spec: Body, local: Mapping[str, Path]
    ) -> list[tuple[str, str]]:
        """(container path, local path) for every mount and termination log of the pod."""
        mapping: dict[str, str] = {}
        containers = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]
        for container in containers:
            for mount in container.get("volumeMounts") or []:
                base = local.get(mount["name"])
                if base is None:
                    continue
                target = base / str(mount.get("subPath") or "")
                mapping.setdefault(str(mount["mountPath"]).rstrip("/") or "/", str(target))
            term = str(container.get("terminationMessagePath") or "/dev/termination-log")
            mapping.setdefault(term, str(self._termination_file(run, container["name"])))
        # Claims mounted at <root>/<claim name> (the data probe's layout): <root> itself is the
        # local folder of the claims, so a program given only the root finds each claim.
        for parent, folder in self._claim_roots(pod_spec, local):
            mapping.setdefault(parent, folder)
        return list(mapping.items())

    def _claim_roots(self, pod_spec: Body, local: Mapping[str, Path]) -> list[tuple[str, str]]:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec.get("volumes") or []
            if "persistentVolumeClaim" in v
        }
        roots: list[tuple[str, str]] = []
        for container in pod_spec.get("containers") or []:
            for mount in container.get("volumeMounts") or []:
                claim = claims.get(mount["name"])
                path = PurePosixPath(str(mount["mountPath"]))
                if claim is None or mount.get("subPath") or path.name != claim:
                    continue
                if local[mount["name"]].name == claim:
                    roots.append((str(path.parent), str(local[mount["name"]].parent)))
        return roots

    @staticmethod
    def _termination_file(run: PodRun, container: str) -> Path:
        return run.directory / "termination" / container

    def _secret_value(self, name: str, key: str) -> str | None:
        secret = self.api.read("secrets", self.namespace, name)
        if secret is None:
            return None
        if key in (secret.get("stringData") or {}):
            return str(secret["stringData"][key])
        raw = (secret.get("data") or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None

    def _configmap_value(self, name: str, key: str) -> str | None:
        cm = self.api.read("configmaps", self.namespace, name)
        return None if cm is None else (cm.get("data") or {}).get(key)

    def container_env(
        self, run: PodRun, container: Mapping[str, Any], mapping: Sequence[tuple[str, str]]
    ) -> dict[str, str]:
        """The process environment: this machine's, the packages' path, then the container's."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join(
            [*PACKAGE_ROOTS, trainer_root(), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["PYTHONUNBUFFERED"] = "1"
        for source in container.get("envFrom") or []:
            prefix = str(source.get("prefix") or "")
            if "secretRef" in source:
                found = self.api.read("secrets", self.namespace, source["secretRef"]["name"])
                data = {} if found is None else {
                    k: base64.b64decode(v).decode() for k, v in (found.get("data") or {}).items()
                }  # fmt: skip
            else:
                found = self.api.read("configmaps", self.namespace, source["configMapRef"]["name"])
                data = {} if found is None else dict(found.get("data") or {})
            if not data and not (source.get("secretRef") or source.get("configMapRef") or {}).get(
                "optional"
            ):
                ref = source.get("secretRef") or source.get("configMapRef") or {}
                if found is None:
                    raise ContainerNotRunnable(f"envFrom {ref.get('name')!r} not found")
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = rewrite_path(str(item["value"]), mapping)
                continue
            ref = item.get("valueFrom") or {}
            value: str | None = None
            if "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                value = self._secret_value(r["name"], r["key"])
                optional = r.get("optional", False)
            elif "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                value = self._configmap_value(r["name"], r["key"])
                optional = r.get("optional", False)
            elif "fieldRef" in ref:
                field_path = ref["fieldRef"].get("fieldPath")
                value = {
                    "metadata.name": run.name,
                    "metadata.namespace": run.namespace,
                    "spec.nodeName": "local",
                    "status.podIP": "127.0.0.1",
                }.get(field_path)
                optional = True
            else:
                optional = True
            if value is None:
                if not optional:
                    raise ContainerNotRunnable(f"env {name}: its secret/configmap key is missing")
                continue
            env[name] = value
        return env

    def _run_pod(self, run: PodRun, pod_spec: Body) -> None:
        try:
            self._run_pod_containers(run, pod_spec)
        except Exception as exc:
            log.exception("local executor: pod %s failed to run", run.name)
            self._finish_pod(run, pod_spec, run.main_container or "main", 128, str(exc), init=False,
                             reason="ContainerCannotRun")  # fmt: skip
        finally:
            run.done.set()

    def _run_pod_containers(self, run: PodRun, pod_spec: Body) -> None:
        local = self._volume_paths(run, pod_spec)
        mapping = self._path_mapping(run, pod_spec, local)
        (run.directory / "termination").mkdir(parents=True, exist_ok=True)
        self._write_config_volumes(pod_spec, local, mapping)
        containers = pod_spec.get("containers") or []
        main = containers[0]
        run.main_container = main["name"]
        for init in pod_spec.get("initContainers") or []:
            self._set_pod_running(run, pod_spec, init["name"], init=True)
            code = self._run_container(run, init, mapping, is_main=False)
            if code != 0:
                self._finish_pod(run, pod_spec, init["name"], code, "", init=True)
                return
        self._set_pod_running(run, pod_spec, main["name"], init=False)
        # Further containers (a data probe has one per source) run one after the other, each
        # with its own termination message; the pod ends when the last one did.
        others: list[tuple[str, int, str]] = []
        for container in containers[1:]:
            own = self._own_termination(run, container, mapping)
            extra = self._run_container(run, container, own, is_main=False)
            others.append((container["name"], extra, self._termination_message(run, container, extra)))  # fmt: skip
        code = self._run_container(run, main, self._own_termination(run, main, mapping), is_main=True)  # fmt: skip
        self._finish_pod(
            run,
            pod_spec,
            main["name"],
            code,
            self._termination_message(run, main, code),
            init=False,
            others=others,
        )

    def _own_termination(
        self, run: PodRun, container: Mapping[str, Any], mapping: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """``mapping`` with the container's termination path mapped to its own file."""
        term = str(container.get("terminationMessagePath") or "/dev/termination-log")
        own = str(self._termination_file(run, container["name"]))
        return [(term, own), *((k, v) for k, v in mapping if k != term)]

    def _termination_message(self, run: PodRun, container: Mapping[str, Any], code: int) -> str:
        path = self._termination_file(run, container["name"])
        with contextlib.suppress(OSError):
            text = path.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace")
            if text.strip():
                return text
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.api.pod_log(run.namespace, run.name, container["name"]).splitlines()
            return "\n".join(lines[-FALLBACK_LOG_LINES:])[-2048:]
        return ""

    def _run_container(
        self,
        run: PodRun,
        container: Mapping[str, Any],
        mapping: Sequence[tuple[str, str]],
        *,
        is_main: bool,
    ) -> int:
        if run.stop_reason is not None:
            return 137
        command = container_command(container, mapping, self.python)
        env = self.container_env(run, container, mapping)
        workdir = rewrite_path(str(container.get("workingDir") or ""), mapping) or str(
            run.directory
        )
        Path(workdir).mkdir(parents=True, exist_ok=True)
        log.info("pod %s: running %s", run.name, " ".join(command))
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one log stream per container, as kubectl logs shows
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
            start_new_session=True,  # its own process group: suspend ends its children too
        )
        run.process = process
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            self.api.append_pod_log(run.namespace, run.name, line, container=container["name"])
            if is_main:
                self.api.append_pod_log(run.namespace, run.name, line)
        code = process.wait()
        run.process = None
        return 128 - code if code < 0 else code  # killed by signal N: 128+N, like a runtime

    def _terminate(self, run: PodRun, reason: str) -> None:
        """End a pod's processes: SIGTERM to the group, SIGKILL after the grace period."""
        if run.stop_reason is None:
            run.stop_reason = reason
        process = run.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

        def kill_later() -> None:
            if not run.done.wait(self.grace_seconds):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

        threading.Thread(target=kill_later, daemon=True, name=f"kill-{run.name}").start()

    # ------------------------------------------------------------ status writers

    def _set_pod_running(self, run: PodRun, pod_spec: Body, container: str, *, init: bool) -> None:
        now = now_rfc3339()
        running = {"name": container, "ready": not init, "started": True, "restartCount": 0,
                   "image": _image(pod_spec, container), "imageID": "",
                   "containerID": f"local://{run.name}/{container}",
                   "state": {"running": {"startedAt": now}}}  # fmt: skip
        status: Body = {
            "phase": "Pending" if init else "Running",
            "podIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "False" if init else "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "False" if init else "True", "lastTransitionTime": now},
            ],
        }  # fmt: skip
        status["initContainerStatuses" if init else "containerStatuses"] = [running]
        with contextlib.suppress(Exception):  # the pod may be deleted meanwhile
            self.api.patch_status("pods", run.namespace, run.name, status)
        if not init:
            with contextlib.suppress(Exception):
                self.api.patch_status("jobs", run.namespace, run.job_name, {"ready": 1})

    def _finish_pod(
        self,
        run: PodRun,
        pod_spec: Body,
        container: str,
        code: int,
        message: str,
        *,
        init: bool,
        reason: str | None = None,
        others: Sequence[tuple[str, int, str]] = (),
    ) -> None:
        now = now_rfc3339()
        reason = reason or ("Completed" if code == 0 else "Error")
        own_code = code
        code = code or next((c for _, c, _ in others if c), 0)  # the pod fails if any did
        run.exit_code = code
        stopped = run.stop_reason
        terminated = {"name": container, "ready": False, "started": False, "restartCount": 0,
                      "image": _image(pod_spec, container), "imageID": "",
                      "containerID": f"local://{run.name}/{container}",
                      "state": {"terminated": {"exitCode": own_code, "reason": reason, "message": message,
                                               "startedAt": now, "finishedAt": now}}}  # fmt: skip
        phase = "Succeeded" if code == 0 and stopped is None else "Failed"
        conditions = [{"type": "Ready", "status": "False", "lastTransitionTime": now,
                       "reason": "PodCompleted" if phase == "Succeeded" else "PodFailed"}]  # fmt: skip
        disrupted = stopped in ("JobSuspended", "ExecutorStopped")
        if disrupted:
            conditions.append({"type": "DisruptionTarget", "status": "True", "lastTransitionTime": now,
                               "reason": "TerminationByKubelet" if stopped == "ExecutorStopped" else "JobSuspended",
                               "message": f"pod terminated: {stopped}"})  # fmt: skip
        status: Body = {"phase": phase, "conditions": conditions}
        finished = [
            {**terminated, "name": name, "image": _image(pod_spec, name),
             "containerID": f"local://{run.name}/{name}",
             "state": {"terminated": {"exitCode": c, "reason": "Completed" if c == 0 else "Error",
                                      "message": m, "startedAt": now, "finishedAt": now}}}
            for name, c, m in others
        ]  # fmt: skip
        status["initContainerStatuses" if init else "containerStatuses"] = [terminated, *finished]
        try:
            self.api.patch_status("pods", run.namespace, run.name, status)
        except Exception:  # the pod may be deleted meanwhile; anything else is worth seeing
            log.warning("local executor: pod %s: final status not written", run.name, exc_info=True)
        if stopped in ("JobSuspended", "JobDeleted", "ExecutorStopped"):
            # The Job controller deletes the pods of a suspended Job; resuming makes new ones.
            if stopped == "JobSuspended":
                with contextlib.suppress(Exception):
                    self.api.request_delete("pods", run.namespace, run.name)
            return
        self._record_job_outcome(run, container, code, stopped)

    def _record_job_outcome(
        self, run: PodRun, container: str, code: int, stopped: str | None
    ) -> None:
        with self._lock:
            state = next((s for s in self.jobs.values() if s.uid == run.job_uid), None)
            job = self.api.read("jobs", run.namespace, run.job_name)
            if state is None or job is None or job["metadata"]["uid"] != run.job_uid:
                return
            spec, status = job.get("spec") or {}, job.get("status") or {}
            conditions = list(status.get("conditions") or [])
            now = now_rfc3339()
            patch: Body = {"active": 0, "ready": 0}
            if code == 0 and stopped is None:
                state.succeeded += 1
                conditions = job_conditions(
                    conditions,
                    "SuccessCriteriaMet",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
                conditions = job_conditions(
                    conditions,
                    "Complete",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
                patch.update(succeeded=state.succeeded, completionTime=now, conditions=conditions)
            else:
                state.failed += 1
                patch["failed"] = state.failed
                action = failure_policy_action(job, container, code)
                if stopped == "DeadlineExceeded":
                    reason, message = (
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    )
                elif action == "FailJob":
                    reason = "PodFailurePolicy"
                    message = f"Container {container} for pod {run.namespace}/{run.name} failed with exit code {code} matching FailJob rule at index 1"
                elif state.failed > int(spec.get("backoffLimit", 6)):
                    reason, message = (
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    )
                else:
                    reason = ""
                    message = ""
                if reason:
                    conditions = job_conditions(
                        conditions, "FailureTarget", "True", reason, message
                    )
                    conditions = job_conditions(conditions, "Failed", "True", reason, message)
                    patch["conditions"] = conditions
            self.api.patch_status("jobs", run.namespace, run.job_name, patch)


def _image(pod_spec: Mapping[str, Any], container: str) -> str:
    for c in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        if c.get("name") == container:
            return str(c.get("image") or "")
    return ""


# ---------------------------------------------------------------- serving


class LocalServing(ServingCluster):
    """The serving simulator with real answers: the tiny base model plus its LoRA adapters.

    Each replica is a :class:`ReferenceServer` on its own 127.0.0.1 port; its generator
    loads the Deployment's ``--model`` (mapped through the PVC mounts) with transformers
    and applies the adapter the request names.
    """

    def _attach_generator(self, pod: SimPod, template: Mapping[str, Any]) -> None:
        if pod.server is None:
            return
        pod_spec = dict(template.get("spec") or {})
        container = next(
            (c for c in pod_spec.get("containers") or []
             if vllm_args.parse_container(c).is_openai_server),
            None,
        )  # fmt: skip
        if container is None:
            return

        def map_path(path: str) -> str:
            return self._local_path(pod_spec, container, path)

        pod.server.generator = TransformersGenerator(pod.server.config.model, map_path)

    async def _start_pod(self, dep: dict[str, Any], h: str) -> SimPod:
        pod = await super()._start_pod(dep, h)
        self._attach_generator(pod, dep["spec"]["template"])
        return pod

    async def _restart(self, pod_name: str) -> None:
        await super()._restart(pod_name)
        pod = self.pods[pod_name]
        dep = self.api.read("deployments", self.namespace, pod.deployment)
        if dep is not None:
            self._attach_generator(pod, dep["spec"]["template"])
