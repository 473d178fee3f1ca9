"""A tiny operator, defined here, runs for real (kopf) against the embedded API server."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf
import kubernetes.client
import pytest
from finetune_local import Emulator, client_configuration
from support.k8s_fixtures import create, get, wait_for

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


class Calls:
    """Handler invocations, per operator identity (handlers run in the operator's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[tuple[str, str, str]] = []

    def add(self, what: str, name: str, memo: Any) -> None:
        with self._lock:
            self.items.append((what, name, getattr(memo, "identity", "?")))

    def count(self, what: str, name: str | None = None) -> int:
        with self._lock:
            return sum(1 for w, n, _ in self.items if w == what and (name is None or n == name))

    def identities(self, what: str) -> set[str]:
        with self._lock:
            return {i for w, _, i in self.items if w == what}


def demo_operator(calls: Calls) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, backoff=0.2)
    def create_child(
        name: str, namespace: str, spec: Any, body: Any, patch: Any, memo: Any, **_: Any
    ) -> None:
        calls.add("create", name, memo)
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config", "labels": {"app": "demo"}},
            "data": {"method": str(spec.get("method", ""))},
        }
        kopf.adopt(config_map, owner=body)
        kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, config_map)
        patch.status["phase"] = "Created"
        patch.status["child"] = config_map["metadata"]["name"]

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    def resumed(name: str, memo: Any, **_: Any) -> None:
        calls.add("resume", name, memo)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def cleanup(name: str, memo: Any, **_: Any) -> None:
        calls.add("delete", name, memo)

    return registry


def ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"method": "qlora", **spec},
    }


def custom_api(emulator: Emulator) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(
        kubernetes.client.ApiClient(client_configuration(str(emulator.url)))
    )


def test_create_adopt_status_finalizer_then_delete_and_collect(
    emulator: Emulator, operator_runner: Any
) -> None:
    calls = Calls()
    operator_runner(demo_operator(calls), memo=kopf.Memo(identity="a"))
    api = custom_api(emulator)
    created = api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, ftj("job-1"))
    uid = created["metadata"]["uid"]
    assert created["metadata"]["generation"] == 1
    assert created["metadata"]["creationTimestamp"]

    child = wait_for(
        lambda: get("configmaps", "default", "job-1-config"), what="the child ConfigMap"
    )
    (owner,) = child["metadata"]["ownerReferences"]
    assert owner["uid"] == uid and owner["kind"] == "FineTuneJob" and owner["controller"] is True
    assert child["data"] == {"method": "qlora"}

    job = wait_for(
        lambda: (o := get(PLURAL, "default", "job-1")) and o.get("status", {}).get("phase") and o
    )
    assert job["status"]["child"] == "job-1-config"
    assert job["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
    assert job["metadata"]["generation"] == 1  # finalizer, annotations and status do not count
    assert int(job["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert calls.count("create") == 1

    api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "job-1")
    wait_for(lambda: get(PLURAL, "default", "job-1") is None, what="the FineTuneJob to go")
    assert calls.count("delete", "job-1") == 1
    assert get("configmaps", "default", "job-1-config") is None  # garbage-collected with its owner


@pytest.mark.parametrize("status", [429, 500])
def test_injected_server_errors_on_status_patch_are_retried_and_converge(
    emulator: Emulator, operator_runner: Any, status: int
) -> None:
    calls = Calls()
    fault = emulator.inject_fault(PLURAL, status, subresource="status", count=2)
    operator_runner(demo_operator(calls))
    create(ftj("job-2"))
    job = wait_for(
        lambda: (o := get(PLURAL, "default", "job-2")) and o.get("status", {}).get("phase") and o
    )
    assert fault.served == 2  # both injected answers were seen, and kopf retried past them
    assert job["status"]["phase"] == "Created"
    assert calls.count("create", "job-2") == 1


def test_conflict_on_status_patch_is_not_retried_by_kopf(
    emulator: Emulator, operator_runner: Any
) -> None:
    """kopf retries 429/5xx per request but not 409: that cycle's status is lost.

    The real API server only answers 409 to writes that carry a resourceVersion, which
    kopf's own merge patches never do; an operator that sends preconditioned writes must
    retry conflicts itself, and must recompute status from observed state.
    """
    calls = Calls()
    fault = emulator.inject_fault(PLURAL, 409, subresource="status", count=1)
    operator_runner(demo_operator(calls))
    create(ftj("job-2"))
    wait_for(lambda: fault.served == 1 and calls.count("create", "job-2") == 1)
    wait_for(
        lambda: (
            "kopf.zalando.org/last-handled-configuration"
            in (
                (get(PLURAL, "default", "job-2") or {}).get("metadata", {}).get("annotations") or {}
            )
        )
    )
    time.sleep(1.0)  # longer than the throttling delay of the test settings
    assert "phase" not in (get(PLURAL, "default", "job-2") or {}).get("status", {})
    assert calls.count("create", "job-2") == 1


def test_restarted_operator_resumes_without_rerunning_create(
    emulator: Emulator, operator_runner: Any
) -> None:
    calls = Calls()
    registry = demo_operator(calls)
    first = operator_runner(registry, memo=kopf.Memo(identity="first"))
    create(ftj("job-3"))
    wait_for(lambda: (get(PLURAL, "default", "job-3") or {}).get("status", {}).get("phase"))
    first.stop()
    assert not first.running

    operator_runner(registry, memo=kopf.Memo(identity="second"))
    wait_for(
        lambda: calls.count("resume", "job-3") >= 1, what="the resume handler of the second run"
    )
    time.sleep(0.5)  # give a wrongly re-running create handler the chance to show up
    assert calls.count("create", "job-3") == 1
    assert calls.identities("resume") >= {"second"}


@pytest.mark.parametrize("selector, expected", [
    ("app=demo", {"a", "b"}),
    ("app=demo,tier!=gpu", {"a"}),
    ("tier in (gpu, cpu)", {"b", "c"}),
    ("!tier", {"a"}),
    ("tier", {"b", "c"}),
])  # fmt: skip
def test_label_selectors_filter_lists(
    emulator: Emulator, selector: str, expected: set[str]
) -> None:
    core = kubernetes.client.CoreV1Api(
        kubernetes.client.ApiClient(client_configuration(str(emulator.url)))
    )
    labels = {"a": {"app": "demo"}, "b": {"app": "demo", "tier": "gpu"}, "c": {"tier": "cpu"}}
    for name, label_set in labels.items():
        core.create_namespaced_config_map(
            "default", {"metadata": {"name": name, "labels": label_set}}
        )
    found = core.list_namespaced_config_map("default", label_selector=selector)
    assert {item.metadata.name for item in found.items} == expected


def test_operator_reconnects_after_watch_streams_are_cut(
    emulator: Emulator, operator_runner: Any
) -> None:
    calls = Calls()
    operator_runner(demo_operator(calls))
    create(ftj("before-cut"))
    wait_for(lambda: calls.count("create", "before-cut") == 1)
    wait_for(lambda: emulator.open_watches > 0)
    assert emulator.cut_watches(PLURAL) >= 1
    create(ftj("after-cut"))
    wait_for(
        lambda: get("configmaps", "default", "after-cut-config"),
        what="the child made after reconnecting",
    )
    assert calls.count("create") == 2


class ResumeLog(logging.Handler):
    """Which operator threads (named after their identity) logged that they resume after peering."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Resuming operations"):
            self.threads.add(record.threadName or "")


def test_peered_operators_only_the_higher_priority_one_acts(
    emulator: Emulator, operator_runner: Any
) -> None:
    """kopf starts paused when peering; the follower stays paused while the leader lives."""
    calls = Calls()
    registry = demo_operator(calls)
    emulator.create({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                     "metadata": {"name": "default", "namespace": "default"}})  # fmt: skip

    def peers() -> set[str]:
        return set((get("kopfpeerings", "default", "default") or {}).get("status") or {})

    resumes = ResumeLog()
    kopf_logger = logging.getLogger("kopf")
    level = kopf_logger.level
    kopf_logger.setLevel(logging.INFO)
    kopf_logger.addHandler(resumes)
    try:
        leader = operator_runner(
            registry, peering="default", priority=100, memo=kopf.Memo(identity="leader")
        )
        wait_for(lambda: leader.identity in peers(), what="the leader's peering record")
        wait_for(lambda: leader.identity in resumes.threads, what="the leader to resume")
        follower = operator_runner(
            registry, peering="default", priority=10, memo=kopf.Memo(identity="follower")
        )
        wait_for(lambda: follower.identity in peers(), what="the follower's peering record")

        create(ftj("peered"))
        wait_for(lambda: get("configmaps", "default", "peered-config"))
        time.sleep(0.5)
        assert calls.identities("create") == {"leader"}
        assert follower.identity not in resumes.threads

        leader.stop()  # the leader removes its record on exit; the follower resumes
        wait_for(lambda: follower.identity in resumes.threads, what="the follower to resume")
        assert leader.identity not in peers()
        create(ftj("after-failover"))
        wait_for(lambda: get("configmaps", "default", "after-failover-config"))
        assert calls.identities("create") == {"leader", "follower"}
        assert calls.count("create", "peered") == 1
    finally:
        kopf_logger.removeHandler(resumes)
        kopf_logger.setLevel(level)


def test_stopping_leaves_no_threads_behind(emulator: Emulator) -> None:
    from finetune_local import run_operator

    before = set(threading.enumerate())
    calls = Calls()
    with run_operator(emulator, demo_operator(calls)) as run:
        create(ftj("job-4"))
        wait_for(
            lambda: calls.count("create", "job-4") == 1
        )  # a sync handler ran in kopf's executor
        assert run.running
    assert not run.running
    assert set(threading.enumerate()) <= before


async def test_async_runner_from_an_async_test(emulator: Emulator) -> None:
    from finetune_local import run_operator_async
    from support.k8s_fixtures import async_wait_for

    calls = Calls()
    async with run_operator_async(emulator, demo_operator(calls)) as run:
        create(ftj("job-5"))
        await async_wait_for(lambda: get("configmaps", "default", "job-5-config"))
        assert run.running
    assert not run.running
