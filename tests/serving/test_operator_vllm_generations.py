"""Serving scenarios where vLLM generations answer differently, run against both.

The operator runs for real; the pods are reference servers imitating vLLM 0.11 ("0.11") or
vLLM 0.20-0.34 ("0.34").
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from finetune_local.vllm_reference import GENERATIONS
from support.adapters import make_adapter, write_manifest
from support.k8s_fixtures import wait_for
from support.serving_env import (
    NS,
    Env,
    adapter_deployment,
    canary_strategy,
    rollbacks,
    runtime_strategy,
    start_serving_operator,
    uri_source,
    vllm_deployment,
)


@pytest.fixture(params=GENERATIONS)
def env(
    request: pytest.FixtureRequest,
    emulator: Emulator,
    operator_runner: Any,
    tmp_path: Path,
) -> Iterator[Env]:
    overrides: dict[str, Any] = {}
    with ServingCluster(
        emulator, NS, tmp_path / "pvc", lambda _d, _t: dict(overrides), generation=request.param
    ) as cluster:
        start_serving_operator(operator_runner)
        e = Env(emulator, cluster, tmp_path)
        e.overrides = overrides  # type: ignore[attr-defined]
        e.generation = request.param  # type: ignore[attr-defined]
        yield e


def test_runtime_rank_above_maximum_fails_at_once_with_vllms_reason(env: Env) -> None:
    # vLLM 0.11 refuses this load with 400, vLLM 0.20+ with 500: both are final, and the
    # rollback starts without waiting for the 30 s progress deadline.
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "bad", rank=8, config_rank=64)
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1), strategy=runtime_strategy()))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2)})
    env.wait_phase("support", "RolledBack", timeout=15)
    degraded = env.condition("support", "Degraded")
    assert degraded["reason"] == "LoadFailed"
    assert "LoRA rank 64 is greater than max_lora_rank 16." in degraded["message"]
    assert "Call to add_lora" not in degraded["message"]


def test_runtime_upgrade_swaps_the_adapter_in_place_where_vllm_can(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1), strategy=runtime_strategy()))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2)})
    env.wait_available_at("support", d2, 15)
    servers = env.cluster.servers("llm")
    assert {s.adapters["support"] for s in servers} == {uri2.removeprefix("file://")}
    unloads = [r for s in servers for r in s.requests_seen if r == "POST /v1/unload_lora_adapter"]
    if env.generation == "0.11":  # type: ignore[attr-defined]
        assert len(unloads) == len(servers)  # no load_inplace: unload, then load
    else:
        assert unloads == []  # load_inplace: the adapter is served throughout


def test_a_runtime_reload_without_a_final_answer_is_made_again(env: Env) -> None:
    """One pod answers the upgrade's load 503 and keeps serving revision 1: the load is made
    again, and the upgrade completes only once every pod lists revision 2's path."""
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1), strategy=runtime_strategy()))
    env.wait_phase("support", "Available")
    busy = env.cluster.servers("llm")[0]
    busy.unavailable_loads = 1
    env.set_spec("support", {"source": uri_source(uri2, d2)})
    env.wait_available_at("support", d2, 15)
    assert busy.unavailable_loads == 0  # the 503 was answered
    servers = env.cluster.servers("llm")
    assert [s.adapters.get("support") for s in servers] == [uri2.removeprefix("file://")] * 2
    assert [p["digest"] for p in env.status("support")["pods"]] == [d2, d2]


def test_canary_of_a_model_without_chat_template_is_promoted(env: Env) -> None:
    env.overrides["chat_template"] = False  # type: ignore[attr-defined]
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": canary_strategy()})
    env.wait_available_at("support", d2, 30)
    assert env.status("support")["canary"]["revision"]["outcome"] == "Promoted"


def test_a_slow_canary_is_aborted_and_a_fast_one_promoted_by_generation_speed(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    uri3, d3 = make_adapter(env.root, "v3")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    # Only the smoke requests reach the canary: "[support] Say hello." is three tokens, two
    # of them decoded, at 0.05 s each on the slow canary: at most 20 tokens/s.
    strategy = canary_strategy(minTokensPerSecondPerRequest=50)
    before = rollbacks("support", "CanarySlowGeneration")
    env.overrides["decode_seconds_per_token"] = 0.05  # type: ignore[attr-defined]
    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": strategy})
    st = env.wait_phase("support", "RolledBack", timeout=30)
    degraded = env.condition("support", "Degraded")
    assert degraded["reason"] == "CanarySlowGeneration", degraded
    assert "below minTokensPerSecondPerRequest 50" in degraded["message"]
    assert st["canary"]["tokensPerSecondPerRequest"] <= 20.0
    assert st["current"]["digest"] == d1 and env.modules() == {
        "support": uri1.removeprefix("file://")
    }
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Available"),
        (2, "CanaryAborted"),
    ]
    wait_for(lambda: env.api.read("deployments", NS, "support-canary") is None, 10)
    assert rollbacks("support", "CanarySlowGeneration") == before + 1

    env.overrides.clear()  # type: ignore[attr-defined]
    env.set_spec("support", {"source": uri_source(uri3, d3), "strategy": strategy})
    env.wait_available_at("support", d3, 30)
    st = env.status("support")
    assert st["canary"]["revision"]["outcome"] == "Promoted"
    assert st["canary"]["tokensPerSecondPerRequest"] > 50
    assert env.modules() == {"support": uri3.removeprefix("file://")}


def test_runtime_upgrade_from_the_same_path_gets_a_new_adapter_id(env: Env) -> None:
    # New weights written over the old folder: an in-place load would keep vLLM's
    # prefix-cache blocks of the old weights, so the operator unloads and loads instead.
    uri, d1 = make_adapter(env.root, "v")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri, d1), strategy=runtime_strategy()))
    env.wait_phase("support", "Available")
    ids = [s.adapter_ids["support"] for s in env.cluster.servers("llm")]
    folder = Path(uri.removeprefix("file://"))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(256))
    d2 = write_manifest(folder, "hf://org/tiny-base", 8)
    env.set_spec("support", {"source": uri_source(uri, d2)})
    env.wait_available_at("support", d2, 15)
    servers = env.cluster.servers("llm")
    assert [s.adapter_ids["support"] for s in servers] != ids
    assert all("POST /v1/unload_lora_adapter" in s.requests_seen for s in servers)


def test_serving_cluster_gives_servers_the_api_key_of_a_secret(
    emulator: Emulator, tmp_path: Path
) -> None:
    key = "sk-from-secret-51c0"
    emulator.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "vllm-key", "namespace": NS},
            "data": {"key": base64.b64encode(key.encode()).decode()},
        }
    )
    dep = vllm_deployment()
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["env"].append(
        {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "key"}}}
    )
    with ServingCluster(emulator, NS, tmp_path / "pvc", generation="0.34") as cluster:
        emulator.create(dep)
        wait_for(lambda: len(cluster.servers("llm")) == 2, 10)
        assert [s.config.api_keys for s in cluster.servers("llm")] == [[key], [key]]
        assert all(s.config.allow_runtime_lora_updating for s in cluster.servers("llm"))
