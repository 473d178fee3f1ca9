"""AdapterDeployment scenarios against the embedded API: vLLM Deployments, AdapterDeployments,
rollout strategies and an `Env` that reads what the operator did."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from finetune_operator import metrics_serving
from finetune_operator.serving import vllm_args

from support.k8s_fixtures import wait_for

NS = "default"
BASE = "org/tiny-base"


def vllm_deployment(
    name: str = "llm",
    extra: list[str] | None = None,
    replicas: int = 2,
    runtime_updates: bool = True,
    progress_deadline_seconds: int = 1,
) -> dict:
    args = [BASE, "--enable-lora", "--port", "8000", *(extra or [])]
    env = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}] if runtime_updates else []
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": progress_deadline_seconds,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": "vllm/vllm-openai",
                            "command": ["vllm", "serve"],
                            "args": args,
                            "env": env,
                        }
                    ]
                },
            },
        },
    }


def adapter_deployment(
    name: str, source: dict, *, adapter: str | None = None, target: dict | None = None, **spec: Any
) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "adapterName": adapter or name,
            "source": source,
            "target": target or {"deployment": "llm", "container": "vllm"},
            **spec,
        },
    }


def uri_source(uri: str, digest: str) -> dict:
    return {"uri": uri, "digest": digest}


class Env:
    def __init__(self, api: Emulator, cluster: ServingCluster, root: Path) -> None:
        self.api, self.cluster, self.root = api, cluster, root

    def status(self, name: str) -> dict:
        obj = self.api.read("adapterdeployments", NS, name) or {}
        return obj.get("status") or {}

    def condition(self, name: str, type_: str) -> dict:
        return next(
            (c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {}
        )

    def wait_phase(self, name: str, phase: str, timeout: float = 20.0) -> dict:
        wait_for(
            lambda: self.status(name).get("phase") == phase,
            timeout,
            what=lambda: f"{name} phase {phase}: {self.status(name)}",
        )
        return self.status(name)

    def wait_available_at(self, name: str, digest: str, timeout: float = 20.0) -> dict:
        """Wait until ``name`` is Available with ``digest`` as its current revision."""
        wait_for(
            lambda: (
                self.status(name).get("phase") == "Available"
                and (self.status(name).get("current") or {}).get("digest") == digest
            ),
            timeout,
            what=lambda: f"{name} Available at {digest}: {self.status(name)}",
        )
        return self.status(name)

    def deployment(self, name: str = "llm") -> dict:
        return self.api.read("deployments", NS, name) or {}

    def modules(self, name: str = "llm") -> dict[str, str]:
        container = self.deployment(name)["spec"]["template"]["spec"]["containers"][0]
        return {m.name: m.path for m in vllm_args.parse_container(container).lora_modules}

    def set_spec(self, name: str, spec: dict) -> None:
        self.api.merge_patch("adapterdeployments", NS, name, {"spec": spec})

    def served(self, deployment: str = "llm") -> list[set[str]]:
        """Adapters each running server of the Deployment has loaded."""
        return [set(s.adapters) for s in self.cluster.servers(deployment)]

    def chat(self, deployment: str, model: str) -> list[int]:
        async def ask() -> list[int]:
            codes = []
            async with aiohttp.ClientSession() as session:
                for server in self.cluster.servers(deployment):
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    async with session.post(
                        server.endpoint + "/v1/chat/completions", json=body
                    ) as r:
                        codes.append(r.status)
            return codes

        result: list[int] = self.cluster.call(ask())
        return result


def start_serving_operator(operator_runner: Any) -> Any:
    """The AdapterDeployment controller alone, with the tests' fast local configuration."""
    import finetune_operator.handlers.adapterdeployment as handlers

    from support.cluster import FAST

    return operator_runner(handlers, memo=kopf.Memo(config=FAST))


def env_with_every_handler(
    emulator: Emulator, operator_runner: Any, tmp_path: Path
) -> Iterator[Env]:
    """An Env whose operator registers every handler, as in the operator pod, with the
    controller tests' fast configuration (for fixtures of other test folders)."""
    import finetune_operator.main  # noqa: F401  (every handler)
    import kopf
    from finetune_operator.clients.kube import KubeClient

    from support.cluster import FAST

    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        memo = kopf.Memo(config=FAST, kube=KubeClient.from_url(str(emulator.url)))
        operator_runner(memo=memo, namespaces=[NS])
        yield Env(emulator, cluster, tmp_path)


def rollbacks(adapter: str, reason: str) -> float:
    value = metrics_serving.ROLLBACKS.labels(NS, adapter, reason)._value.get()
    return float(value)


def canary_strategy(**analysis: Any) -> dict:
    settings = {
        "intervalSeconds": 1,
        "checks": 2,
        "smokeRequests": 4,
        "maxErrorRate": 0.1,
        "maxLatencyP95Ms": 1000,
    }
    settings.update(analysis)
    return {
        "type": "Canary",
        "canary": {"replicas": 1, "analysis": settings},
        "progressDeadlineSeconds": 30,
    }


def runtime_strategy() -> dict:
    return {"type": "Runtime", "progressDeadlineSeconds": 30}
