"""The local executor as the Job controller and kubelet: small Python containers, real processes."""

from __future__ import annotations

import base64
import json
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_local.emulator import Emulator
from finetune_local.executor import (
    LocalExecutor,
    container_command,
    failure_policy_action,
    local_command,
    rewrite_file_text,
    rewrite_path,
)
from finetune_local.schema import to_json_schema
from support.k8s_fixtures import wait_for

# Runs pods as real processes and waits for them.
pytestmark = pytest.mark.slow

NS = "default"

# The script each test container runs: it reads its config file and a secret from env,
# appends a tick to a file on the PVC once per 0.1 s until `ticks` are there, and writes
# its termination message.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, pathlib
    cfg = json.loads(pathlib.Path(sys.argv[1]).read_text())
    state = pathlib.Path(cfg["state"])
    state.parent.mkdir(parents=True, exist_ok=True)
    print("token", os.environ.get("TOKEN"), "home", os.environ.get("HOME"), flush=True)
    while len(state.read_text().splitlines() if state.exists() else []) < cfg["ticks"]:
        with state.open("a") as f:
            f.write("tick\\n")
        time.sleep(0.1)
    pathlib.Path(cfg["termination"]).write_text(json.dumps({"ok": True}))
    print("done", flush=True)
    sys.exit(cfg["exit"])
    """
)


def job(name: str, *, ticks: int = 1, exit_code: int = 0, backoff: int = 0, **spec: Any) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "backoffLimit": backoff,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": "main", "operator": "In", "values": [3]}}]},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "main",
                        "image": "python",
                        "command": ["python", "-c", SCRIPT, "/etc/cfg/run.json"],
                        "env": [
                            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                            {"name": "HOME", "value": "/scratch/home"},
                        ],
                        "volumeMounts": [
                            {"name": "cfg", "mountPath": "/etc/cfg"},
                            {"name": "data", "mountPath": "/mnt/data"},
                            {"name": "scratch", "mountPath": "/scratch"},
                        ],
                        "terminationMessagePath": "/dev/termination-log",
                    }],
                    "volumes": [
                        {"name": "cfg", "configMap": {"name": f"{name}-cfg"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                        {"name": "scratch", "emptyDir": {}},
                    ],
                },
            },
            **spec,
        },
    }  # fmt: skip


def config_map(name: str, *, ticks: int, exit_code: int) -> dict:
    run = json.dumps({"state": f"/mnt/data/{name}.ticks", "ticks": ticks, "exit": exit_code,
                      "termination": "/dev/termination-log"})  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-cfg", "namespace": NS},
        "data": {"run.json": run},
    }


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Emulator, LocalExecutor]]:
    api = Emulator()
    api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NS},
                "data": {"token": base64.b64encode(b"s3cret").decode()}})  # fmt: skip
    with LocalExecutor(
        api, tmp_path, namespace=NS, serve_deployments=False, interval=0.05, grace_seconds=2
    ) as executor:
        yield api, executor


def submit(api: Emulator, name: str, *, ticks: int = 1, exit_code: int = 0, **spec: Any) -> None:
    api.create(config_map(name, ticks=ticks, exit_code=exit_code))
    api.create(job(name, ticks=ticks, exit_code=exit_code, **spec))


def condition(obj: dict | None, type_: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None


def pods_of(api: Emulator, name: str) -> list[dict]:
    return api.read_all("pods", NS, f"job-name={name}")


def test_rewrites_only_whole_path_components() -> None:
    mapping = [("/tmp", "/w/tmp"), ("/mnt/pvc/models", "/w/pvc/models"), ("/mnt/pvc", "/w/pvc")]
    assert rewrite_path("/tmp/hf", mapping) == "/w/tmp/hf"
    assert rewrite_path("/tmpx", mapping) == "/tmpx"
    assert rewrite_path("/mnt/pvc/models/a", mapping) == "/w/pvc/models/a"
    assert rewrite_path("--config=/mnt/pvc/x.yaml", mapping) == "--config=/w/pvc/x.yaml"
    assert rewrite_path("relative/tmp", mapping) == "relative/tmp"
    text = rewrite_file_text(
        "job.yaml", "paths:\n  outputDir: /mnt/pvc/out\nname: /tmpfoo\n", mapping
    )
    assert "outputDir: /w/pvc/out" in text and "name: /tmpfoo" in text


def test_the_local_interpreter_is_not_rewritten_when_it_lives_under_a_mount() -> None:
    # A checkout under /tmp while the pod mounts an emptyDir at /tmp.
    mapping = [("/tmp", "/w/pod/tmp")]
    container = {
        "name": "t",
        "command": ["finetune-trainer"],
        "args": ["train", "--config", "/tmp/job.yaml"],
    }
    python = "/tmp/checkout/.venv/bin/python"
    assert container_command(container, mapping, python) == [
        python, "-m", "finetune_trainer.cli", "train", "--config", "/w/pod/tmp/job.yaml",
    ]  # fmt: skip


def test_console_scripts_of_the_images_run_from_this_interpreter() -> None:
    trainer = {"name": "t", "command": ["finetune-trainer"], "args": ["train", "--config", "c"]}
    assert local_command(trainer) == [
        sys.executable,
        "-m",
        "finetune_trainer.cli",
        "train",
        "--config",
        "c",
    ]
    fetch = {
        "name": "f",
        "command": ["python", "-m", "finetune_trainer.fetch"],
        "args": ["--uri", "x"],
    }
    assert local_command(fetch)[:3] == [sys.executable, "-m", "finetune_trainer.fetch"]
    with pytest.raises(RuntimeError, match="no command"):
        local_command({"name": "x", "image": "busybox"})


def test_failure_policy_matches_exit_codes_of_the_named_container() -> None:
    spec = job("x")
    assert failure_policy_action(spec, "main", 3) == "FailJob"
    assert failure_policy_action(spec, "main", 1) is None
    assert failure_policy_action(spec, "other", 3) is None


def test_openapi_exclusive_bounds_become_json_schema_bounds() -> None:
    schema = to_json_schema({"type": "number", "minimum": 0, "exclusiveMinimum": True})
    assert schema == {"type": "number", "exclusiveMinimum": 0}
    inclusive = to_json_schema({"type": "number", "minimum": 0, "exclusiveMinimum": False})
    assert inclusive == {"type": "number", "minimum": 0}


def test_a_job_runs_as_a_pod_with_volumes_env_logs_and_termination_message(cluster: Any) -> None:
    api, executor = cluster
    submit(api, "ok", ticks=2)
    done = wait_for(lambda: condition(api.read("jobs", NS, "ok"), "Complete"), timeout=60)
    assert done["status"] == "True"
    status = api.read("jobs", NS, "ok")["status"]
    assert status["succeeded"] == 1 and status["active"] == 0
    assert status["startTime"] and status["completionTime"]
    [pod] = pods_of(api, "ok")
    labels = pod["metadata"]["labels"]
    assert labels["batch.kubernetes.io/job-name"] == "ok" and labels["app"] == "ok"
    owner = pod["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Job" and owner["uid"] == api.read("jobs", NS, "ok")["metadata"]["uid"]
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["message"] == '{"ok": true}'
    log = api.pod_log(NS, pod["metadata"]["name"], "main")
    scratch = executor.workdir / "pods" / NS / pod["metadata"]["name"] / "volumes" / "scratch"
    assert f"token s3cret home {scratch}/home" in log and "done" in log
    assert (executor.pvc_path("data") / "ok.ticks").read_text().count("tick") == 2


def test_a_pod_that_succeeds_during_a_pass_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass of the Job controller that read its Jobs just before a pod recorded success
    must not take the done pod for a lost one and start another (it did, at random, under
    load: two trainer pods for one FineTuneJob)."""
    api = Emulator()
    api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": NS},
                "data": {"token": base64.b64encode(b"s3cret").decode()}})  # fmt: skip
    executor = LocalExecutor(
        api, tmp_path, namespace=NS, serve_deployments=False, interval=0.05, grace_seconds=2
    )
    read_all = api.read_all

    def read_then_let_pods_finish(kind: str, *args: Any, **kwargs: Any) -> Any:
        found = read_all(kind, *args, **kwargs)
        if kind == "jobs":  # the read is done; a pod finishing now makes it stale
            for state in list(executor.jobs.values()):
                if state.pod is not None:
                    state.pod.done.wait(0.5)
        return found

    monkeypatch.setattr(api, "read_all", read_then_let_pods_finish)
    with executor:
        submit(api, "once", ticks=1)
        wait_for(lambda: condition(api.read("jobs", NS, "once"), "Complete"), timeout=60)
        time.sleep(1.0)  # passes after the outcome
        assert len(pods_of(api, "once")) == 1
        assert api.read("jobs", NS, "once")["status"]["succeeded"] == 1


def test_non_retryable_exit_code_fails_the_job_at_once(cluster: Any) -> None:
    api, _executor = cluster
    submit(api, "bad", exit_code=3, backoff=4)
    failed = wait_for(lambda: condition(api.read("jobs", NS, "bad"), "Failed"), timeout=60)
    assert failed["reason"] == "PodFailurePolicy"
    assert len(pods_of(api, "bad")) == 1
    [pod] = pods_of(api, "bad")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_failed_pods_are_retried_up_to_the_backoff_limit(cluster: Any) -> None:
    api, _executor = cluster
    submit(api, "flaky", exit_code=1, backoff=1)
    failed = wait_for(lambda: condition(api.read("jobs", NS, "flaky"), "Failed"), timeout=60)
    assert failed["reason"] == "BackoffLimitExceeded"
    assert api.read("jobs", NS, "flaky")["status"]["failed"] == 2
    assert len(pods_of(api, "flaky")) == 2


def test_suspend_kills_the_pod_and_resume_continues_from_the_volume(cluster: Any) -> None:
    api, executor = cluster
    submit(api, "long", ticks=60)
    ticks = executor.pvc_path("data") / "long.ticks"
    wait_for(lambda: ticks.exists() and ticks.read_text().count("tick") >= 3, timeout=60)
    first = pods_of(api, "long")[0]["metadata"]["name"]
    api.merge_patch("jobs", NS, "long", {"spec": {"suspend": True}})
    wait_for(lambda: not pods_of(api, "long"), timeout=30, what="pod deleted on suspend")
    suspended = wait_for(lambda: condition(api.read("jobs", NS, "long"), "Suspended"), timeout=10)
    assert suspended["status"] == "True"
    count = ticks.read_text().count("tick")
    time.sleep(0.5)
    assert ticks.read_text().count("tick") == count, "the process still runs after suspend"
    assert count < 60

    api.merge_patch("jobs", NS, "long", {"spec": {"suspend": False}})
    wait_for(lambda: condition(api.read("jobs", NS, "long"), "Complete"), timeout=60)
    [second] = pods_of(api, "long")
    assert second["metadata"]["name"] != first
    assert ticks.read_text().count("tick") == 60  # continued, not restarted
    assert condition(api.read("jobs", NS, "long"), "Suspended")["status"] == "False"
    assert api.read("jobs", NS, "long")["status"].get("failed") is None


def test_deleting_the_job_stops_its_process(cluster: Any) -> None:
    api, executor = cluster
    submit(api, "gone", ticks=600)
    ticks = executor.pvc_path("data") / "gone.ticks"
    wait_for(lambda: ticks.exists() and ticks.read_text().count("tick") >= 2, timeout=60)
    api.request_delete("jobs", NS, "gone")
    wait_for(lambda: not pods_of(api, "gone"), timeout=30, what="pods collected with the Job")
    time.sleep(0.5)
    count = ticks.read_text().count("tick")
    time.sleep(0.5)
    assert ticks.read_text().count("tick") == count


def test_a_deleted_pod_is_replaced_while_the_backoff_limit_allows(cluster: Any) -> None:
    api, executor = cluster
    submit(api, "evicted", ticks=30, backoff=1)
    ticks = executor.pvc_path("data") / "evicted.ticks"
    wait_for(lambda: ticks.exists() and ticks.read_text().count("tick") >= 2, timeout=60)
    first = pods_of(api, "evicted")[0]["metadata"]["name"]
    api.request_delete("pods", NS, first)
    wait_for(lambda: condition(api.read("jobs", NS, "evicted"), "Complete"), timeout=60)
    status = api.read("jobs", NS, "evicted")["status"]
    assert status["failed"] == 1 and status["succeeded"] == 1
    assert [p["metadata"]["name"] for p in pods_of(api, "evicted")] != [first]


def test_every_container_of_a_pod_runs_and_reports_its_own_termination_message(
    cluster: Any,
) -> None:
    """A data probe's pod has one container per source, each writing its result to the
    termination path it names: the pod ends when all ran, each with its own message."""
    api, _executor = cluster
    write = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
    containers = [
        {"name": name, "image": "python", "command": ["python", "-c", write],
         "args": ["/dev/termination-log", f"result of {name}"],
         "terminationMessagePath": "/dev/termination-log"}
        for name in ("probe-train", "probe-eval")
    ]  # fmt: skip
    body = job("probe")
    body["spec"]["template"]["spec"] = {"restartPolicy": "Never", "containers": containers}
    api.create(body)
    wait_for(lambda: condition(api.read("jobs", NS, "probe"), "Complete"), timeout=30)
    (pod,) = pods_of(api, "probe")
    messages = {
        s["name"]: s["state"]["terminated"]["message"] for s in pod["status"]["containerStatuses"]
    }
    assert messages == {
        "probe-train": "result of probe-train",
        "probe-eval": "result of probe-eval",
    }


def test_a_program_given_the_folder_of_the_claims_finds_each_claim(cluster: Any) -> None:
    """The data probe mounts each claim at /mnt/pvc/<claim> and is told /mnt/pvc only."""
    api, executor = cluster
    executor.pvc_path("data").mkdir(parents=True)
    (executor.pvc_path("data") / "train.jsonl").write_text("row\n")
    read = (
        "import pathlib, sys; pathlib.Path(sys.argv[2]).write_text("
        "(pathlib.Path(sys.argv[1]) / 'data/train.jsonl').read_text())"
    )
    body = job("reader")
    body["spec"]["template"]["spec"] = {
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "python", "command": ["python", "-c", read],
                        "args": ["/mnt/pvc", "/dev/termination-log"],
                        "volumeMounts": [{"name": "d", "mountPath": "/mnt/pvc/data", "readOnly": True}]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}],
    }  # fmt: skip
    api.create(body)
    wait_for(lambda: condition(api.read("jobs", NS, "reader"), "Complete"), timeout=30)
    (pod,) = pods_of(api, "reader")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "row\n"
