"""The running controller reads serving Deployments through the vLLM server model: ConfigMaps
the container takes settings from, its API key, and what vLLM refuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.local import Emulator
from finetune_operator.local.serving_cluster import ServingCluster

from .adapters import make_adapter
from .test_operator_serving import (
    NS,
    Env,
    adapter_deployment,
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
