"""The embedded API server answers like a real one where the operator depends on it."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import kubernetes.client
import pytest
from finetune_local import Emulator, client_configuration
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


@pytest.fixture
def client(emulator: Emulator) -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(client_configuration(str(emulator.url)))


@pytest.fixture
def custom(client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(client)


@pytest.fixture
def core(client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(client)


def ftj(name: str = "job", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, **meta},
        "spec": {"method": "qlora"},
        "status": {"phase": "Forged"},
    }


def get_json(emulator: Emulator, path: str) -> Any:
    with urllib.request.urlopen(f"{emulator.url}{path}") as response:
        return json.loads(response.read())


def watch_lines(emulator: Emulator, path: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{emulator.url}{path}", timeout=10) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def test_create_sets_server_managed_metadata_and_drops_status(custom: Any) -> None:
    first = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, ftj("a"))
    second = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, ftj("b"))
    meta = first["metadata"]
    assert meta["uid"] != second["metadata"]["uid"]
    assert meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert "status" not in first  # the status subresource owns status, even on create


def test_generate_name_and_already_exists(custom: Any) -> None:
    made = custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, ftj("", generateName="tune-")
    )
    assert made["metadata"]["name"].startswith("tune-") and len(made["metadata"]["name"]) == 10
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, ftj(made["metadata"]["name"])
        )
    assert caught.value.status == 409
    assert json.loads(caught.value.body)["reason"] == "AlreadyExists"


def test_generation_counts_spec_changes_only(custom: Any, emulator: Emulator) -> None:
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, ftj())
    rv0 = int(created["metadata"]["resourceVersion"])

    labelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "job", {"metadata": {"labels": {"team": "nlp"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > rv0

    with_status = custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "job",
        {"status": {"phase": "Running"}, "spec": {"method": "lora"}},
    )
    assert with_status["metadata"]["generation"] == 1
    assert with_status["status"] == {"phase": "Running"}
    assert with_status["spec"] == {"method": "qlora"}  # /status writes touch status only

    respec = custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "job",
        {"spec": {"method": "lora"}, "status": {"phase": "Hacked"}},
    )
    assert respec["metadata"]["generation"] == 2
    assert respec["status"] == {"phase": "Running"}  # main-resource writes ignore status

    rv = respec["metadata"]["resourceVersion"]
    emulator.reset_counters()
    same = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "job", {"status": {"phase": "Running"}}
    )
    assert same["metadata"]["resourceVersion"] == rv  # nothing changed: no new version, no event
    assert emulator.noop_status_writes == 1
    assert emulator.count("patch", f"{PLURAL}/status") == 1


def test_stale_resource_version_conflicts(custom: Any) -> None:
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, ftj())
    stale = created["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "job", {"spec": {"x": 1}}
    )

    replacement = dict(created, spec={"method": "lora"})
    with pytest.raises(ApiException) as caught:
        custom.replace_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, "job", replacement
        )
    assert caught.value.status == 409
    with pytest.raises(ApiException) as caught:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "job",
            {"metadata": {"resourceVersion": stale}, "spec": {"x": 2}},
        )
    assert caught.value.status == 409

    unversioned = dict(created, metadata={"name": "job", "namespace": "default"})
    with pytest.raises(ApiException) as caught:
        custom.replace_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, "job", unversioned
        )
    assert caught.value.status == 422  # custom resources need a resourceVersion on PUT

    fresh = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "job")
    replaced = custom.replace_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "job", dict(fresh, spec={"method": "lora"})
    )
    assert replaced["spec"] == {"method": "lora"}
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced["metadata"]["generation"] == 3


def test_failed_json_patch_test_answers_422(emulator: Emulator, client: Any) -> None:
    emulator.create(ftj())
    request = urllib.request.Request(
        f"{emulator.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/job",
        data=json.dumps([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
        ]).encode(),
        headers={"Content-Type": "application/json-patch+json"},
        method="PATCH",
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 422
    assert "finalizers" not in (emulator.read(PLURAL, "default", "job") or {})["metadata"]


def test_finalizers_hold_deletion_until_removed(emulator: Emulator, custom: Any) -> None:
    emulator.create(ftj(finalizers=["example.com/keep"]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "job")
    held = emulator.read(PLURAL, "default", "job")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["generation"] == 2
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "job", {"metadata": {"finalizers": None}}
    )
    assert emulator.read(PLURAL, "default", "job") is None


def owned(kind: str, name: str, owner: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    refs = [
        {
            "apiVersion": o["apiVersion"],
            "kind": o["kind"],
            "name": o["metadata"]["name"],
            "uid": o["metadata"]["uid"],
        }
        for o in (owner, *more)
    ]
    api_version = "batch/v1" if kind == "Job" else "v1"
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": "default", "ownerReferences": refs},
    }


def test_garbage_collection_follows_owner_references(emulator: Emulator) -> None:
    job = emulator.create(ftj())
    other = emulator.create(ftj("other"))
    batch_job = emulator.create(owned("Job", "trainer", job))
    pod = emulator.create(owned("Pod", "trainer-pod", batch_job))
    shared = emulator.create(owned("ConfigMap", "shared", job, other))
    emulator.create(owned("ConfigMap", "orphan-me", other))

    emulator.request_delete(PLURAL, "default", "job")
    assert emulator.read("jobs", "default", "trainer") is None
    assert emulator.read("pods", "default", pod["metadata"]["name"]) is None  # grandchild too
    survivor = emulator.read("configmaps", "default", "shared")
    assert survivor is not None  # another owner still lives: only the dangling reference goes
    assert [ref["uid"] for ref in survivor["metadata"]["ownerReferences"]] == [
        other["metadata"]["uid"]
    ]
    assert shared["metadata"]["uid"] == survivor["metadata"]["uid"]

    emulator.request_delete(PLURAL, "default", "other", propagation="Orphan")
    orphan = emulator.read("configmaps", "default", "orphan-me")
    assert orphan is not None and orphan["metadata"]["ownerReferences"] == []


def test_watch_resumes_from_a_resource_version_and_filters_labels(emulator: Emulator) -> None:
    emulator.create(ftj("before", labels={"team": "a"}))
    listing = get_json(emulator, f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}")
    since = listing["metadata"]["resourceVersion"]
    emulator.create(ftj("after-a", labels={"team": "a"}))
    emulator.create(ftj("after-b", labels={"team": "b"}))
    emulator.merge_patch(PLURAL, "default", "before", {"spec": {"x": 1}})

    base = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}?watch=true&timeoutSeconds=0.2"
    events = watch_lines(emulator, f"{base}&resourceVersion={since}&labelSelector=team%3Da")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after-a"),
        ("MODIFIED", "before"),
    ]
    fresh = watch_lines(emulator, base)  # no resourceVersion: the current state as ADDED
    assert sorted(e["object"]["metadata"]["name"] for e in fresh) == [
        "after-a",
        "after-b",
        "before",
    ]
    assert {e["type"] for e in fresh} == {"ADDED"}


def test_watch_streams_live_events_and_expired_versions_get_410() -> None:
    from finetune_local import serve

    api = Emulator(event_log_limit=2)
    with serve(api):
        api.create(ftj("one"))
        listed = get_json(api, f"/apis/{GROUP}/{VERSION}/{PLURAL}")
        timer = threading.Timer(0.2, lambda: api.create(ftj("live")))
        timer.start()
        live = watch_lines(
            api, f"/apis/{GROUP}/{VERSION}/{PLURAL}?watch=true&timeoutSeconds=1"
            f"&resourceVersion={listed['metadata']['resourceVersion']}",
        )  # fmt: skip
        timer.join()
        assert [e["object"]["metadata"]["name"] for e in live] == ["live"]

        for index in range(3):
            api.create(ftj(f"more-{index}"))
        expired = watch_lines(
            api,
            f"/apis/{GROUP}/{VERSION}/{PLURAL}?watch=true&resourceVersion={listed['metadata']['resourceVersion']}",
        )
        assert expired[0]["type"] == "ERROR" and expired[0]["object"]["code"] == 410


def test_pod_logs_termination_messages_and_workload_status(
    emulator: Emulator, core: Any, client: Any
) -> None:
    emulator.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer", "namespace": "default"},
                     "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]}})  # fmt: skip
    emulator.set_pod_log("default", "trainer", "".join(f"line {i}\n" for i in range(10)))
    assert core.read_namespaced_pod_log("trainer", "default", tail_lines=2) == "line 8\nline 9\n"
    assert core.read_namespaced_pod_log("trainer", "default", container="trainer").count("\n") == 10

    emulator.terminate_container(
        "default", "trainer", exit_code=3, message='{"ok":false}', reason="Error"
    )
    pod = core.read_namespaced_pod("trainer", "default")
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message) == (3, '{"ok":false}')

    batch = kubernetes.client.BatchV1Api(client)
    batch.create_namespaced_job("default", {"metadata": {"name": "trainer"}, "spec": {"template": {"spec": {
        "containers": [{"name": "trainer", "image": "trainer:1"}], "restartPolicy": "Never"}}}})  # fmt: skip
    emulator.set_job_finished("default", "trainer", succeeded=True)
    job = batch.read_namespaced_job_status("trainer", "default")
    assert job.status.succeeded == 1
    assert {c.type for c in job.status.conditions} >= {"Complete"}

    apps = kubernetes.client.AppsV1Api(client)
    apps.create_namespaced_deployment("default", {"metadata": {"name": "vllm"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "vllm"}}, "template": {
            "metadata": {"labels": {"app": "vllm"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm:1", "env": [{"name": "A", "value": "1"}]}]}}}})  # fmt: skip
    emulator.set_deployment_ready("default", "vllm", ready=1)
    assert apps.read_namespaced_deployment_status("vllm", "default").status.ready_replicas == 1

    # The official client sends dict patches as strategic merge patches: containers merge by name.
    apps.patch_namespaced_deployment("vllm", "default", {"spec": {"template": {"spec": {"containers": [
        {"name": "vllm", "env": [{"name": "B", "value": "2"}]}]}}}})  # fmt: skip
    container = apps.read_namespaced_deployment("vllm", "default").spec.template.spec.containers[0]
    assert container.image == "vllm:1"
    assert [(e.name, e.value) for e in container.env] == [("A", "1"), ("B", "2")]


def test_injected_faults_answer_then_expire(emulator: Emulator, custom: Any) -> None:
    emulator.create(ftj())
    fault = emulator.inject_fault(PLURAL, 429, count=2, verbs=["patch"], retry_after_seconds=1)
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, "job", {"spec": {"x": 1}}
            )
        assert caught.value.status == 429
        assert caught.value.headers["Retry-After"] == "1"
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "job", {"spec": {"x": 1}}
    )
    assert fault.served == 2 and fault.remaining == 0
    assert emulator.count("patch", PLURAL) == 3


def test_discovery_announces_our_resources_and_subresources(emulator: Emulator) -> None:
    core = get_json(emulator, "/api/v1")
    assert core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods/log"]["verbs"] == ["get"]
    assert by_name["pods/status"]["verbs"] == ["get", "patch", "update"]
    assert by_name["namespaces"]["namespaced"] is False
    ours = {r["name"]: r for r in get_json(emulator, f"/apis/{GROUP}/{VERSION}")["resources"]}
    assert ours["finetunejobs"]["kind"] == "FineTuneJob"
    assert ours["finetunejobs"]["shortNames"] == ["ftj"]
    assert "finetunejobs/status" in ours and "adapterdeployments/status" in ours
    groups = {g["name"] for g in get_json(emulator, "/apis")["groups"]}
    assert {"apps", "batch", "coordination.k8s.io", "events.k8s.io", "kopf.dev", GROUP} <= groups


def test_unknown_objects_and_resources_answer_404(custom: Any, emulator: Emulator) -> None:
    with pytest.raises(ApiException) as caught:
        custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "missing")
    assert caught.value.status == 404
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(f"{emulator.url}/apis/{GROUP}/{VERSION}/namespaces/default/widgets")
    assert http.value.code == 404
    time.sleep(0)


def test_namespaces_and_events_about_an_object(emulator: Emulator, core: Any) -> None:
    assert {n.metadata.name for n in core.list_namespace().items} == {"default", "kube-system"}
    core.create_namespace({"metadata": {"name": "team-a"}})
    assert core.read_namespace("team-a").metadata.name == "team-a"
    core.create_namespaced_event("team-a", {
        "metadata": {"generateName": "job."}, "reason": "Created", "message": "made the trainer",
        "involvedObject": {"kind": "FineTuneJob", "name": "job", "namespace": "team-a"},
    })  # fmt: skip
    (event,) = emulator.events_about("team-a", "job", kind="FineTuneJob")
    assert event["message"] == "made the trainer"
    assert emulator.events_about("team-a", "other") == []


def test_selector_watch_sees_objects_enter_and_leave_the_selection(emulator: Emulator) -> None:
    emulator.create(ftj("moving", labels={"team": "a"}))
    since = get_json(emulator, f"/apis/{GROUP}/{VERSION}/{PLURAL}")["metadata"]["resourceVersion"]

    def relabel() -> None:
        time.sleep(0.1)
        emulator.merge_patch(PLURAL, "default", "moving", {"metadata": {"labels": {"team": "b"}}})
        emulator.merge_patch(PLURAL, "default", "moving", {"metadata": {"labels": {"team": "a"}}})

    mover = threading.Thread(target=relabel)
    mover.start()
    events = watch_lines(
        emulator, f"/apis/{GROUP}/{VERSION}/{PLURAL}?watch=true&timeoutSeconds=0.6"
        f"&labelSelector=team%3Da&resourceVersion={since}",
    )  # fmt: skip
    mover.join()
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]


def test_resumed_selector_watch_sees_objects_leave_and_enter_the_selection(
    emulator: Emulator,
) -> None:
    """A watch resumed from a resourceVersion (as kopf reconnects) replays the changes it
    missed as a live watch would have shown them: relabelled out is DELETED, back in ADDED."""
    emulator.create(ftj("moving", labels={"team": "a"}))
    listing = get_json(emulator, f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}")
    since = listing["metadata"]["resourceVersion"]
    emulator.merge_patch(PLURAL, "default", "moving", {"metadata": {"labels": {"team": "b"}}})
    emulator.merge_patch(PLURAL, "default", "moving", {"spec": {"x": 1}})  # outside: unseen
    emulator.merge_patch(PLURAL, "default", "moving", {"metadata": {"labels": {"team": "a"}}})
    events = watch_lines(
        emulator, f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}?watch=true"
        f"&timeoutSeconds=0.2&labelSelector=team%3Da&resourceVersion={since}",
    )  # fmt: skip
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]
    assert events[1]["object"]["spec"]["x"] == 1


def pod_body(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


def test_prefixed_label_keys_select_pods_on_list_and_watch(emulator: Emulator) -> None:
    """What the operator's watches send: `app.kubernetes.io/managed-by=finetune-operator`,
    a prefixed key, on the cluster-wide and the namespaced pod collections."""
    managed = {"app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/generation": "1"}
    emulator.create(pod_body("trainer", managed))
    emulator.create(pod_body("vllm", {"app.kubernetes.io/managed-by": "helm"}))
    emulator.create(pod_body("bare", {}))
    selector = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfinetune-operator"
    for path in ("/api/v1/pods", "/api/v1/namespaces/default/pods"):
        listing = get_json(emulator, f"{path}?{selector}")
        assert [p["metadata"]["name"] for p in listing["items"]] == ["trainer"]
        events = watch_lines(emulator, f"{path}?watch=true&timeoutSeconds=0.2&{selector}")
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "trainer")
        ]
    both = "labelSelector=app.kubernetes.io%2Fmanaged-by%20in%20(finetune-operator%2Chelm)"
    names = {p["metadata"]["name"] for p in get_json(emulator, f"/api/v1/pods?{both}")["items"]}
    assert names == {"trainer", "vllm"}
    bad = urllib.request.Request(f"{emulator.url}/api/v1/pods?labelSelector=a%20%3D%3D%3D%20b")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=5)
    assert refused.value.code == 400
