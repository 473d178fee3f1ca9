"""What a tenant controls cannot turn the AdapterDeployment controller against the cluster:
no probing of the operator's disk through file:// adapters, no calls to addresses other than
the target's own pods, API keys only as Bearer tokens to those pods; and an idle
AdapterDeployment costs the API server nothing."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
from aiohttp import web
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from finetune_operator.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus
from finetune_operator.clients.kube import KubeClient
from finetune_operator.clients.serving_kube import ServingKube
from finetune_operator.clients.vllm import VllmClient
from finetune_operator.handlers import adapterdeployment as handlers
from finetune_operator.planners import adapterdeployment_plan as ad
from finetune_operator.serving import vllm_server
from finetune_operator.serving.serving_config import ENDPOINT_ANNOTATION
from support.adapters import make_adapter
from support.k8s_fixtures import wait_for
from support.serving_env import (
    NS,
    Env,
    adapter_deployment,
    start_serving_operator,
    uri_source,
    vllm_deployment,
)

# ------------------------------------------------------------------ file:// probing


@pytest.fixture
def cluster_env(emulator: Emulator, operator_runner: Any, tmp_path: Path) -> Iterator[Env]:
    """The controller as in a cluster (not local mode) next to emulated serving pods."""
    from support.cluster import FAST

    config = dataclasses.replace(FAST, local_mode=False)
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        operator_runner(handlers, memo=kopf.Memo(config=config))
        yield Env(emulator, cluster, tmp_path)


def test_file_adapters_cannot_probe_the_operators_disk(cluster_env: Env) -> None:
    """The attack: point source.uri at paths on the operator's disk and read the condition
    to learn which exist (and what they hold). Outside local mode every file:// source gets
    the same refusal, the existing adapter included, and the target is never touched."""
    env = cluster_env
    uri, digest = make_adapter(env.root, "real")
    env.api.create(vllm_deployment())
    untouched = env.deployment()["spec"]
    probes = {
        "existing": uri,
        "missing": "file:///no/such/dir",
        "secrets": "file:///var/run/secrets/kubernetes.io/serviceaccount",
    }
    for name, probe in probes.items():
        env.api.create(adapter_deployment(name, uri_source(probe, digest)))
    answers = {}
    for name in probes:
        wait_for(lambda n=name: env.condition(n, "SourceReady").get("status") == "False", 10)
        cond = env.condition(name, "SourceReady")
        answers[name] = (cond["reason"], cond["message"], env.status(name)["phase"])
    assert set(answers.values()) == {(answers["existing"][0], answers["existing"][1], "Failed")}, (
        answers
    )
    assert answers["existing"][0] == "LocalAdapterRefused"
    assert "pvc://" in answers["existing"][1] and "/no/such" not in answers["existing"][1]
    assert env.deployment()["spec"] == untouched


# ------------------------------------------------------------------ where pods are reached


def pod(
    *, ip: str | None = "10.1.2.3", host_network: bool = False, annotation: str | None = None
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "llm-5d8f-abc",
            "labels": {"app": "llm", "pod-template-hash": "5d8f"},
            "annotations": {ENDPOINT_ANNOTATION: annotation} if annotation else {},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "llm-5d8f", "controller": True}],
        },
        "spec": {"hostNetwork": host_network},
        "status": {"podIP": ip} if ip else {},
    }


def test_pods_are_reached_only_at_their_own_ip_on_the_declared_port() -> None:
    tenant_url = "http://169.254.169.254"
    assert handlers.pod_endpoint(pod(), 8000, local_mode=False) == "http://10.1.2.3:8000"
    # The endpoint annotation is anyone's to write: honoured in local mode only.
    assert handlers.pod_endpoint(pod(annotation=tenant_url), 8000, local_mode=False) == (
        "http://10.1.2.3:8000"
    )
    assert handlers.pod_endpoint(pod(annotation=tenant_url), 8000, local_mode=True) == tenant_url
    # A host-network pod's IP is its node's, where the kubelet and other services listen.
    assert handlers.pod_endpoint(pod(host_network=True), 10250, local_mode=False) is None
    assert handlers.pod_endpoint(pod(ip=None), 8000, local_mode=False) is None


def test_only_pods_of_the_targets_own_replicasets_count_as_its_pods() -> None:
    assert handlers.owning_deployment(pod()) == "llm"
    bare = pod()
    bare["metadata"]["ownerReferences"] = []  # a tenant's pod with the same labels
    assert handlers.owning_deployment(bare) is None
    other = pod()
    other["metadata"]["ownerReferences"][0]["name"] = "other-5d8f"
    assert handlers.owning_deployment(other) == "other"
    not_controller = pod()
    not_controller["metadata"]["ownerReferences"][0]["controller"] = False
    assert handlers.owning_deployment(not_controller) is None


# ------------------------------------------------------------------ API keys


def keyed_deployment(env_var: dict[str, Any] | None = None, args: list[str] = ()) -> dict:
    dep = vllm_deployment(extra=list(args))
    if env_var is not None:
        dep["spec"]["template"]["spec"]["containers"][0]["env"].append(env_var)
    return dep


@pytest.mark.parametrize(
    ("env_var", "args", "key"),
    [
        (None, ["--api-key", "k1"], "k1"),
        (None, ["--api-key=k2"], "k2"),
        ({"name": "VLLM_API_KEY", "value": "k3"}, [], "k3"),
        (
            {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            [],
            "k4",
        ),
        (None, [], None),
    ],
)
def test_where_the_servers_api_key_comes_from(env_var, args, key) -> None:
    source = vllm_server.inspect(keyed_deployment(env_var, args), container="vllm").api_key
    assert vllm_server.resolve_api_key(source, {"s": {"token": "k4"}}) == key
    assert key is None or key not in repr(source)


def observed(dep: dict[str, Any]) -> ad.Observed:
    body = adapter_deployment("support", uri_source("pvc://adapters/a", "sha256:" + "1" * 64))
    return ad.Observed(
        name="support", namespace=NS, uid="u", generation=1,
        spec=AdapterDeploymentSpec.model_validate(body["spec"]),
        status=AdapterDeploymentStatus(), target=dep,
    )  # fmt: skip


def test_the_key_is_read_from_the_secret_and_sent_as_a_bearer_token(emulator: Emulator) -> None:
    secret_value = "sk-serving-7f3a"
    emulator.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "vllm-key", "namespace": NS},
            "data": {"token": base64.b64encode(secret_value.encode()).decode()},
        }
    )
    dep = keyed_deployment(
        {
            "name": "VLLM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "token"}},
        }
    )
    seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {secret_value}":
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        return web.json_response({"data": [{"id": "support", "root": "/a", "parent": "m"}]})

    async def scenario() -> dict[str, str]:
        kube = ServingKube(KubeClient.from_url(str(emulator.url)))
        app = web.Application()
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            key = await handlers.read_api_key(kube, observed(dep))
            assert key == secret_value
            async with aiohttp.ClientSession() as session:
                client = VllmClient(session, 5.0).with_api_key(key)
                return await client.loaded_adapters(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
            await kube.close()

    assert asyncio.run(scenario()) == {"support": "/a"}
    assert seen == [f"Bearer {secret_value}"]


def test_the_key_never_reaches_status_events_or_logs(
    emulator: Emulator, operator_runner: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret_value = "sk-serving-9b1c"
    emulator.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "vllm-key", "namespace": NS},
            "data": {"token": base64.b64encode(secret_value.encode()).decode()},
        }
    )
    dep = keyed_deployment(
        {
            "name": "VLLM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "token"}},
        }
    )
    caplog.set_level("DEBUG")
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        start_serving_operator(operator_runner)
        env = Env(emulator, cluster, tmp_path)
        uri, digest = make_adapter(tmp_path, "v1")
        emulator.create(dep)
        emulator.create(
            adapter_deployment(
                "support", uri_source(uri, digest),
                strategy={"type": "Runtime", "progressDeadlineSeconds": 30},
            )
        )  # fmt: skip
        env.wait_phase("support", "Available")
        everything = json.dumps(
            [env.status("support"), emulator.read_all("events", NS)]
        ) + "\n".join(r.getMessage() for r in caplog.records)
    assert secret_value not in everything
    assert base64.b64encode(secret_value.encode()).decode() not in everything


# ------------------------------------------------------------------ idle costs nothing


def test_idle_and_failed_adapterdeployments_send_no_requests(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("served", uri_source(uri, digest)))
    env.api.create(adapter_deployment("broken", uri_source(uri, digest), adapter="x",
                                      target={"deployment": "nowhere"}))  # fmt: skip
    env.wait_phase("served", "Available")
    env.wait_phase("broken", "Failed")
    time.sleep(1.0)  # the last status writes and their echoes
    env.api.reset_counters()
    time.sleep(3.0)  # 30 poll intervals of the tests' configuration
    sent = {
        key: n for key, n in env.api.request_counts.items() if key[0] != "watch"
    }  # fmt: skip
    assert sent == {}, f"idle AdapterDeployments sent requests: {sent}"


@pytest.fixture
def env(emulator: Emulator, operator_runner: Any, tmp_path: Path) -> Iterator[Env]:
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        start_serving_operator(operator_runner)
        yield Env(emulator, cluster, tmp_path)


# ------------------------------------------------------------------ changes, not polls


def test_changes_are_acted_on_through_watch_events_alone(
    emulator: Emulator, operator_runner: Any, tmp_path: Path
) -> None:
    """With a poll interval of an hour, a FineTuneJob that succeeds starts the rollout, the
    rollout completes as the Deployment reports progress, and a Runtime pod that restarted
    gets its adapter back: each is a watch event, not a poll."""
    from support.cluster import FAST

    config = dataclasses.replace(FAST, serving_poll_seconds=3600, serving_max_backoff_seconds=3600)
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        operator_runner(handlers, memo=kopf.Memo(config=config))
        env = Env(emulator, cluster, tmp_path)
        uri, digest = make_adapter(tmp_path, "v1")
        emulator.create(vllm_deployment())
        emulator.create(vllm_deployment("llm-rt"))
        emulator.create(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "tune", "namespace": NS},
                "spec": {},
                "status": {"phase": "Training", "conditions": []},
            },
            keep_status=True,
        )
        emulator.create(adapter_deployment("support", {"fineTuneJobRef": {"name": "tune"}}))
        env.wait_phase("support", "Pending")
        emulator.patch_status(
            "finetunejobs", NS, "tune",
            {
                "phase": "Succeeded",
                "conditions": [{"type": "GatesPassed", "status": "True", "reason": "GatesPassed"}],
                "adapter": {"uri": uri, "digest": digest, "rank": 8},
            },
        )  # fmt: skip
        env.wait_phase("support", "Available", timeout=15)

        emulator.create(
            adapter_deployment(
                "runtime", uri_source(uri, digest), adapter="rt",
                target={"deployment": "llm-rt", "container": "vllm"},
                strategy={"type": "Runtime", "progressDeadlineSeconds": 30},
            )
        )  # fmt: skip
        env.wait_phase("runtime", "Available", timeout=15)
        restarted = sorted(n for n, p in cluster.pods.items() if p.deployment == "llm-rt")[0]
        cluster.restart_pod(restarted)
        wait_for(lambda: "rt" in cluster.pods[restarted].server.adapters, 30)
