"""Servers the operator misread before it read command lines the way vLLM does.

These use only functions that existed before the server model (check_compatible,
parse_container, set_lora_module, set_max_loras, runtime_updates_allowed), so each one
shows the old failure.
"""

from __future__ import annotations

import pytest
from finetune_operator.builders import serving as sb
from finetune_operator.planners import adapterdeployment as p
from finetune_operator.serving import vllm_args as va

REF = sb.AdapterRef("support", "pvc://out/a", "sha256:" + "1" * 64, "hf://org/base", 16)


def _spec(container: str | None = None, strategy: str = "Rolling"):
    target = {"deployment": "llm", **({"container": container} if container else {})}
    return p.AdapterDeploymentSpec.model_validate(
        {
            "adapterName": "support",
            "source": {"fineTuneJobRef": {"name": "ftj"}},
            "target": target,
            "strategy": {"type": strategy},
        }
    )


def _deployment(*containers: dict) -> dict:
    return {
        "metadata": {"name": "llm"},
        "spec": {"template": {"spec": {"containers": list(containers)}}},
    }


@pytest.mark.parametrize(
    "container",
    [
        # The vLLM image with args only: its entry point is `vllm serve`.
        {
            "name": "vllm",
            "image": "vllm/vllm-openai:v0.11.0",
            "args": ["org/base", "--enable-lora"],
        },
        # vLLM's Kubernetes guide: command [/bin/sh, -c] and one string.
        {
            "name": "vllm",
            "image": "vllm/vllm-openai:latest",
            "command": ["/bin/sh", "-c"],
            "args": ["vllm serve org/base --enable-lora --port 8000"],
        },
        # vllm/entrypoints/cli/main.py run as a module.
        {
            "name": "vllm",
            "image": "example/vllm:1",
            "command": ["python", "-m", "vllm.entrypoints.cli.main", "serve", "org/base"],
            "args": ["--enable-lora"],
        },
    ],
)
def test_common_servers_are_detected(container: dict) -> None:
    res = p.check_compatible(_spec("vllm"), "adep", _deployment(container), REF)
    assert res.ok, res.message


def test_vllm_container_is_found_among_sidecars() -> None:
    proxy = {"name": "auth-proxy", "image": "envoy:1", "args": ["--config", "/etc/envoy.yaml"]}
    server = {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.11.0",
        "args": ["org/base", "--enable-lora"],
    }
    res = p.check_compatible(_spec(None), "adep", _deployment(proxy, server), REF)
    assert res.ok, res.message


def test_underscore_rank_counts() -> None:
    # FlexibleArgumentParser.parse_args turns _ into - in flag names.
    container = {"command": ["vllm", "serve", "m", "--enable-lora", "--max_lora_rank", "64"]}
    assert va.parse_container(container).max_lora_rank == 64


def test_underscore_enable_lora_counts() -> None:
    assert va.parse_container({"command": ["vllm", "serve", "m", "--enable_lora"]}).enable_lora


def test_adapters_under_another_spelling_are_kept() -> None:
    container = {"command": ["vllm", "serve", "m", "--enable-lora", "--lora_modules", "a=/a"]}
    out = va.set_lora_module(container, va.LoraModule("b", "/b"))
    names = [m.name for m in va.parse_container(out).lora_modules]
    assert names == ["a", "b"]
    tokens = va.split_tokens(out)
    assert "--lora_modules" not in tokens and tokens.count("--lora-modules") == 1


def test_raising_max_loras_raises_max_cpu_loras() -> None:
    container = {"command": ["vllm", "serve", "m", "--enable-lora", "--max-cpu-loras", "2"]}
    out = va.set_max_loras(container, 4)
    tokens = va.split_tokens(out)
    assert tokens[tokens.index("--max-cpu-loras") + 1] == "4"


def test_runtime_updating_yes_is_off_for_vllm() -> None:
    # vllm/envs.py: on only for "1" or "true".
    container = {"env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "yes"}]}
    assert p.runtime_updates_allowed(container) is False
