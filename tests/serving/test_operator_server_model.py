"""The running controller reads serving Deployments through the vLLM server model: ConfigMaps
the container takes settings from, its API key, and what vLLM refuses."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from support.adapters import make_adapter
from support.k8s_fixtures import wait_for
from support.serving_env import (
    NS,
    Env,
    adapter_deployment,
    canary_strategy,
    runtime_strategy,
    start_serving_operator,
    uri_source,
    vllm_deployment,
)


@pytest.fixture
def env(emulator: Emulator, operator_runner: Any, tmp_path: Path) -> Iterator[Env]:
    overrides: dict[str, Any] = {}
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: dict(overrides)) as cluster:
        start_serving_operator(operator_runner)
        e = Env(emulator, cluster, tmp_path)
        e.overrides = overrides  # type: ignore[attr-defined]
        yield e


def _container(dep: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = dep["spec"]["template"]["spec"]["containers"][0]
    return container


def with_config_file(dep: dict[str, Any], configmap: str) -> dict[str, Any]:
    """The server reads --config from a file mounted out of ``configmap``."""
    pod_spec = dep["spec"]["template"]["spec"]
    pod_spec["volumes"] = [{"name": "serve-config", "configMap": {"name": configmap}}]
    container = _container(dep)
    container["volumeMounts"] = [{"name": "serve-config", "mountPath": "/etc/vllm"}]
    container["args"] += ["--config", "/etc/vllm/serve.yaml"]
    return dep


def configmap(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": NS},
        "data": data,
    }


def test_a_config_file_in_a_configmap_is_read_and_kept_by_the_rollout(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(configmap("serve-config", {"serve.yaml": "max-loras: 2\n"}))
    env.api.create(with_config_file(vllm_deployment(), "serve-config"))
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    env.wait_phase("support", "Available")
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "Compatible", compatible
    args = _container(env.deployment())["args"]
    assert args[args.index("--config") + 1] == "/etc/vllm/serve.yaml"
    assert set(env.modules()) == {"support"}


def test_a_config_file_whose_configmap_is_missing_is_refused(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(with_config_file(vllm_deployment(), "not-there"))
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    env.wait_phase("support", "Failed")
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "ServerConfigUnreadable", compatible
    assert "not-there" in compatible["message"]


def test_runtime_is_refused_on_data_parallel_vllm_020(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    dep = vllm_deployment(extra=["--data-parallel-size", "2"])
    _container(dep)["image"] = "vllm/vllm-openai:v0.20.0"
    env.api.create(dep)
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=runtime_strategy())
    )
    env.wait_phase("support", "Failed")
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "RuntimeUpdatesDisabled", compatible
    assert "2 API-server processes" in compatible["message"]
    assert "strategy Rolling" in compatible["message"]


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _nowhere_but_the_pods(env: Env, key: str) -> None:
    events = env.api.read_all("events", NS)
    assert key not in json.dumps(env.status("support")) + json.dumps(events)


@pytest.mark.parametrize(
    "env_source",
    [
        {"valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "token"}}},
        "envFrom",
    ],
    ids=["secretKeyRef", "envFrom"],
)
def test_the_key_of_a_secret_reaches_the_pods_in_a_runtime_load(
    env: Env, env_source: dict[str, Any] | str
) -> None:
    key = "sk-secret-7d21"
    uri, digest = make_adapter(env.root, "v1")
    dep = vllm_deployment()
    if env_source == "envFrom":
        env.api.create(_secret("vllm-key", {"VLLM_API_KEY": key}))
        _container(dep)["envFrom"] = [{"secretRef": {"name": "vllm-key"}}]
    else:
        assert isinstance(env_source, dict)
        env.api.create(_secret("vllm-key", {"token": key}))
        _container(dep)["env"].append({"name": "VLLM_API_KEY", **env_source})
    env.api.create(dep)
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=runtime_strategy())
    )
    env.wait_phase("support", "Available")
    assert [s.config.api_keys for s in env.cluster.servers("llm")] == [[key], [key]]
    assert env.served() == [{"support"}, {"support"}]
    _nowhere_but_the_pods(env, key)


def test_the_key_of_a_configmap_reaches_the_canary_pods(env: Env) -> None:
    key = "sk-configmap-93aa"
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(configmap("vllm-settings", {"apiKey": key}))
    dep = vllm_deployment()
    ref = {"configMapKeyRef": {"name": "vllm-settings", "key": "apiKey"}}
    _container(dep)["env"].append({"name": "VLLM_API_KEY", "valueFrom": ref})
    env.api.create(dep)
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=canary_strategy())
    )
    env.wait_phase("support", "Available", timeout=30)
    canary = env.status("support")["history"][-1]
    assert canary["outcome"] == "Available", canary
    assert all(s.config.api_keys == [key] for s in env.cluster.servers("llm"))
    _nowhere_but_the_pods(env, key)


def test_a_server_refusing_the_key_is_an_auth_problem_not_an_adapter_fault(env: Env) -> None:
    # The servers want a key the Deployment does not show (e.g. baked into the image).
    env.overrides["api_keys"] = ["sk-only-the-image-knows"]  # type: ignore[attr-defined]
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=runtime_strategy())
    )
    env.wait_phase("support", "RolledBack", timeout=10)  # at once, not after the 30 s deadline
    degraded = env.condition("support", "Degraded")
    assert degraded["reason"] == "Unauthorized", degraded
    assert "API key" in degraded["message"] and "adapter was not tried" in degraded["message"]
    assert "sk-only-the-image-knows" not in json.dumps(env.status("support"))
    assert env.served() == [set(), set()]


def test_a_canary_whose_pods_refuse_the_key_is_aborted_as_an_auth_problem(env: Env) -> None:
    env.overrides["api_keys"] = ["sk-only-the-image-knows"]  # type: ignore[attr-defined]
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=canary_strategy())
    )
    env.wait_phase("support", "RolledBack", timeout=20)
    degraded = env.condition("support", "Degraded")
    assert degraded["reason"] == "Unauthorized", degraded
    assert "canary pods refused" in degraded["message"]


@pytest.mark.parametrize("form", ["image entry point", "sh -c"])
def test_servers_in_other_forms_start_and_serve_the_adapter(env: Env, form: str) -> None:
    uri, digest = make_adapter(env.root, "v1")
    dep = vllm_deployment()
    container = _container(dep)
    if form == "image entry point":  # the vLLM image runs the server itself: args only
        container["image"] = "vllm/vllm-openai:v0.11.0"
        del container["command"]
    else:
        words = " ".join(container.pop("args"))
        container["command"] = ["/bin/sh", "-c"]
        container["args"] = [f"exec vllm serve {words}"]
    env.api.create(dep)
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    env.wait_phase("support", "Available")
    assert env.served() == [{"support"}, {"support"}]


def test_a_canary_whose_engine_never_runs_the_adapter_is_not_promoted(env: Env) -> None:
    # Its answers name the adapter, but vLLM's scheduler never ran it (the base model did).
    env.overrides["schedule_adapters"] = False  # type: ignore[attr-defined]
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=canary_strategy())
    )
    env.wait_phase("support", "RolledBack", timeout=20)
    degraded = env.condition("support", "Degraded")
    assert degraded["reason"] == "CanarySmokeFailed", degraded
    assert "never scheduled that adapter" in degraded["message"]
    assert "support" not in env.modules()  # the target was never touched


def test_a_target_port_other_than_the_servers_is_refused_until_the_spec_names_it(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment(extra=["--port", "9000"]))  # the last --port wins
    target = {"deployment": "llm", "container": "vllm"}  # target.port defaults to 8000
    env.api.create(
        adapter_deployment(
            "support", uri_source(uri, digest), target=target, strategy=canary_strategy()
        )
    )
    env.wait_phase("support", "Failed")
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "TargetPortMismatch", compatible
    assert "target.port is 8000" in compatible["message"]
    assert "set spec.target.port to 9000" in compatible["message"]
    assert env.api.read("deployments", NS, "support-canary") is None  # no half-made canary
    # nothing loaded (the serving pods may still be starting: none of them serves an adapter)
    assert env.modules() == {} and all(not served for served in env.served())

    env.set_spec("support", {"target": {**target, "port": 9000}})
    env.wait_phase("support", "Available", timeout=30)
    assert env.condition("support", "Compatible")["reason"] == "Compatible"
    assert set(env.modules()) == {"support"}


# ------------------------------------------------------------------ what the server reads changes


def _server_reading_its_port_from(configmap: str) -> dict[str, Any]:
    """A vLLM Deployment whose --config file (in ``configmap``) may set the port: no --port
    on its command line, which would win over the file."""
    dep = with_config_file(vllm_deployment(), configmap)
    args = _container(dep)["args"]
    i = args.index("--port")
    del args[i : i + 2]
    return dep


def _set_config(env: Env, name: str, text: str) -> None:
    """The platform team edits the server's config file (nothing else changes)."""
    env.api.merge_patch("configmaps", NS, name, {"data": {"serve.yaml": text}})


def test_a_configmap_edit_alone_lets_a_refused_rollout_start(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(configmap("serve-config", {"serve.yaml": "port: 9000\n"}))
    env.api.create(_server_reading_its_port_from("serve-config"))
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    env.wait_phase("support", "Failed")
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "TargetPortMismatch", compatible
    where = "port: in the server's --config file /etc/vllm/serve.yaml to 8000"
    assert where in compatible["message"], compatible

    _set_config(env, "serve-config", "port: 8000\n")  # neither the AD nor the Deployment
    env.wait_phase("support", "Available", timeout=10)
    assert env.condition("support", "Compatible")["reason"] == "Compatible"
    assert set(env.modules()) == {"support"}


def _available_on_a_config_file(env: Env) -> dict[str, Any]:
    """An AdapterDeployment serving on a server that reads --config from serve-config; the
    target Deployment as it is then."""
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(configmap("serve-config", {"serve.yaml": "max-loras: 2\n"}))
    env.api.create(_server_reading_its_port_from("serve-config"))
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    env.wait_phase("support", "Available")
    return env.deployment()


def _still_serving(env: Env, before: dict[str, Any]) -> None:
    """Nothing was done to the serving Deployment: no patch, no rollback."""
    after = env.deployment()
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"] == before["spec"]
    assert env.status("support")["phase"] == "Available"
    assert env.condition("support", "Available")["status"] == "True"
    assert env.served() == [{"support"}, {"support"}]


def test_a_configmap_moving_the_servers_port_turns_compatible_false_and_back(env: Env) -> None:
    before = _available_on_a_config_file(env)
    _set_config(env, "serve-config", "max-loras: 2\nport: 9000\n")
    wait_for(
        lambda: env.condition("support", "Compatible").get("status") == "False",
        10,
        what=lambda: f"Compatible=False: {env.status('support')}",
    )
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "TargetPortMismatch", compatible
    assert "set spec.target.port to 9000" in compatible["message"]
    _still_serving(env, before)

    def warnings() -> list[str]:
        events = env.api.events_about(NS, "support")
        return [e["reason"] for e in events if e.get("type") == "Warning"]

    # kopf posts events after the status write, from its own task: wait for it
    wait_for(warnings, 10, what="a Warning event")
    assert warnings() == ["TargetPortMismatch"]

    _set_config(env, "serve-config", "max-loras: 2\n")
    wait_for(
        lambda: env.condition("support", "Compatible").get("status") == "True",
        10,
        what=lambda: f"Compatible=True: {env.status('support')}",
    )
    _still_serving(env, before)


def test_a_target_port_edit_on_an_available_adapter_is_checked_and_changes_nothing(
    env: Env,
) -> None:
    before = _available_on_a_config_file(env)
    target = {"deployment": "llm", "container": "vllm"}
    env.set_spec("support", {"target": {**target, "port": 8080}})
    wait_for(
        lambda: env.condition("support", "Compatible").get("status") == "False",
        10,
        what=lambda: f"Compatible=False: {env.status('support')}",
    )
    compatible = env.condition("support", "Compatible")
    assert compatible["reason"] == "TargetPortMismatch", compatible
    assert "target.port is 8080 " in compatible["message"]
    assert "set spec.target.port to 8000" in compatible["message"]
    _still_serving(env, before)

    env.set_spec("support", {"target": {**target, "port": 8000}})
    wait_for(
        lambda: env.condition("support", "Compatible").get("status") == "True",
        10,
        what=lambda: f"Compatible=True: {env.status('support')}",
    )
    _still_serving(env, before)


def _requests(env: Env) -> int:
    """Requests the operator sent, its long-lived watch streams apart."""
    return env.api.count() - env.api.count("watch")


def _settled(env: Env) -> None:
    """Wait until the operator has handled the last events of the rollout (no request for
    half a second)."""
    for _ in range(20):
        before = _requests(env)
        time.sleep(0.5)
        if _requests(env) == before:
            return
    raise AssertionError(f"the operator keeps sending requests: {env.api.request_counts}")


def test_configmaps_the_server_does_not_read_cost_no_request(env: Env) -> None:
    _available_on_a_config_file(env)
    _settled(env)
    env.api.reset_counters()
    env.api.create(configmap("unrelated", {"serve.yaml": "port: 9000\n"}))
    env.api.merge_patch("configmaps", NS, "unrelated", {"data": {"serve.yaml": "port: 1\n"}})
    # A metadata-only change of the one it reads (a label, an annotation) is no change either.
    env.api.merge_patch("configmaps", NS, "serve-config", {"metadata": {"labels": {"a": "b"}}})
    time.sleep(1.0)
    assert _requests(env) == 0, env.api.request_counts

    _set_config(env, "serve-config", "max-loras: 2\nport: 9000\n")  # the watch works
    wait_for(
        lambda: env.condition("support", "Compatible").get("reason") == "TargetPortMismatch",
        10,
        what=lambda: f"TargetPortMismatch: {env.status('support')}",
    )
    assert env.api.count("get", "configmaps") >= 1  # the pass read the file again


def test_a_configmap_turning_runtime_updates_off_is_reported_and_no_pod_is_called(
    env: Env,
) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(configmap("runtime-switch", {"allow": "true"}))
    dep = vllm_deployment(runtime_updates=False)
    ref = {"configMapKeyRef": {"name": "runtime-switch", "key": "allow"}}
    _container(dep)["env"].append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "valueFrom": ref})
    env.api.create(dep)
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=runtime_strategy())
    )
    env.wait_phase("support", "Available")
    before = env.deployment()

    env.api.merge_patch("configmaps", NS, "runtime-switch", {"data": {"allow": "false"}})
    wait_for(
        lambda: env.condition("support", "Compatible").get("reason") == "RuntimeUpdatesDisabled",
        10,
        what=lambda: f"RuntimeUpdatesDisabled: {env.status('support')}",
    )
    _still_serving(env, before)  # the running servers keep the adapter they loaded

    # A container restarting now would start with runtime updates off: it is not called.
    pod = sorted(env.cluster.pods)[0]
    env.cluster.restart_pod(pod)
    time.sleep(1.0)  # several passes' time: the pod event has been seen
    restarted = env.cluster.pods[pod].server
    assert restarted is not None and restarted.requests_seen == [], restarted.requests_seen
