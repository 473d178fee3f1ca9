"""Readers of the Kubernetes objects a run consists of: the trainer Job and its pods."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...builders.trainer import TRAINER_CONTAINER


def run_generation(job_name: str | None) -> int | None:
    """The generation a trainer Job was built for, from its deterministic name."""
    if not job_name:
        return None
    m = re.search(r"-train-g([0-9]+)$", job_name)
    return int(m.group(1)) if m else None


def job_condition(job: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The Job's condition of that type when it is True."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def pod_age_key(pod: Mapping[str, Any]) -> tuple[str, bool, str]:
    """Oldest first; a replacement pod created in the same second as the pod it replaces
    (an eviction) sorts after it, so "the newest pod" is the one still running."""
    meta = pod.get("metadata") or {}
    finished = (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
    return (str(meta.get("creationTimestamp") or ""), not finished, str(meta.get("name") or ""))


def container_status(pod: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == name:
            return dict(cs)
    return None


@dataclass
class PodView:
    """What the newest trainer pod says."""

    phase: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    waiting_container: str = ""
    unschedulable: str = ""
    terminated: Mapping[str, Any] | None = None
    running: bool = False


def pod_view(pod: Mapping[str, Any] | None) -> PodView:
    view = PodView()
    if pod is None:
        return view
    status = pod.get("status") or {}
    view.phase = str(status.get("phase") or "")
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            view.unschedulable = str(cond.get("message") or "no node fits")
    statuses = list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in (
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "CreateContainerConfigError",
            "CreateContainerError",
        ):
            view.waiting_reason = str(waiting["reason"])
            view.waiting_message = str(waiting.get("message") or "")
            view.waiting_container = str(cs.get("name") or "")
            break
    trainer = container_status(pod, TRAINER_CONTAINER)
    if trainer:
        state = trainer.get("state") or {}
        view.running = "running" in state
        view.terminated = state.get("terminated")
    for cs in status.get("initContainerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0 and view.terminated is None:
            view.terminated = {**term, "container": cs.get("name")}
    return view
