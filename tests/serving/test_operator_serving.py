"""The real operator against the emulated API, with vLLM-compatible servers as pods."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from finetune_local.vllm_reference import GENERATIONS
from finetune_operator import metrics_serving
from finetune_operator.builders import serving as sb
from finetune_operator.serving import vllm_args
from support.adapters import make_adapter
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
    request: pytest.FixtureRequest, emulator: Emulator, operator_runner, tmp_path: Path
) -> Iterator[Env]:
    """The serving scenarios run against both vLLM generations the reference server imitates."""
    behaviors: dict[str, dict] = {}

    def behavior(_dep: str, template: dict) -> dict:
        digests = set(((template.get("metadata") or {}).get("annotations") or {}).values())
        out: dict = {}
        for digest in digests:
            out.update(behaviors.get(digest, {}))
        return out

    with ServingCluster(
        emulator, NS, tmp_path / "pvc", behavior, generation=request.param
    ) as cluster:
        run = start_serving_operator(operator_runner)
        e = Env(emulator, cluster, tmp_path)
        e.behaviors = behaviors  # type: ignore[attr-defined]
        e.operator = run  # type: ignore[attr-defined]
        yield e


# ---------------------------------------------------------------------------- Rolling


def rollout_count(strategy: str, outcome: str) -> float:
    for metric in metrics_serving.ROLLOUT_DURATION.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels == {
                "namespace": NS,
                "strategy": strategy,
                "outcome": outcome,
            }:
                return float(sample.value)
    return 0.0


def test_rolling_success_then_upgrade(env: Env) -> None:
    rollouts_before = rollout_count("Rolling", "Available")
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    st = env.wait_phase("support", "Available")
    assert st["current"]["revision"] == 1 and st["current"]["digest"] == d1
    assert env.modules() == {"support": uri1.removeprefix("file://")}
    tpl = env.deployment()["spec"]["template"]
    assert tpl["metadata"]["annotations"][sb.digest_annotation("support")] == d1
    assert env.served() == [{"support"}, {"support"}]
    assert env.chat("llm", "support") == [200, 200]

    # The pods come from the pod watch, the phase from the Deployment's: the list may follow
    # the phase by one reconcile.
    def serving_both_pods() -> dict[str, Any] | None:
        status = env.status("support")
        digests = sorted(p["digest"] for p in status.get("pods") or [])
        return status if digests == [d1, d1] else None

    st = wait_for(serving_both_pods, 10)
    assert st["readyReplicas"] == 2
    assert env.condition("support", "Available")["status"] == "True"
    assert metrics_serving.ADAPTER_INFO.labels(NS, "support", d1, "llm")._value.get() == 1
    wait_for(
        lambda: (
            {"RolloutStarted", "RolloutComplete"}
            <= {e.get("reason") for e in env.api.read_all("events", NS)}
        ),
        10,
    )

    env.set_spec("support", {"source": uri_source(uri2, d2)})
    wait_for(
        lambda: (
            (env.status("support").get("current") or {}).get("digest") == d2
            and env.status("support")["phase"] == "Available"
        ),
        20,
    )
    st = env.status("support")
    assert st["current"]["revision"] == 2
    assert st["previous"]["revision"] == 1 and st["previous"]["outcome"] == "Superseded"
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Superseded"),
        (2, "Available"),
    ]
    assert env.modules() == {"support": uri2.removeprefix("file://")}
    assert rollout_count("Rolling", "Available") == rollouts_before + 2
    assert ("support", d1, "llm") not in {
        tuple(s.labels.values())[1:]
        for m in metrics_serving.ADAPTER_INFO.collect()
        for s in m.samples
    }


def test_rolling_failure_rolls_back_automatically(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "good")
    # The manifest says rank 8 but the weights are rank 64: the server refuses to start.
    uri2, d2 = make_adapter(env.root, "bad", rank=8, config_rank=64)
    env.api.create(vllm_deployment())
    env.api.create(
        adapter_deployment(
            "support", uri_source(uri1, d1), strategy={"progressDeadlineSeconds": 30}
        )
    )
    env.wait_phase("support", "Available")
    before = rollbacks("support", "ProgressDeadlineExceeded")

    env.set_spec("support", {"source": uri_source(uri2, d2)})
    st = env.wait_phase("support", "RolledBack")
    degraded = env.condition("support", "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ProgressDeadlineExceeded"
    assert "greater than max_lora_rank 16" in degraded["message"]  # the pods' own error
    wait_for(
        lambda: env.condition("support", "Available").get("reason") == "PreviousRevisionRestored",
        60,  # new pods start and become Ready first: slow on a loaded 2-core machine
        what=lambda: f"the previous revision restored: {env.status('support')}",
    )
    st = env.status("support")
    assert st["current"]["digest"] == d1 and st["current"]["outcome"] == "Available"
    assert st["previous"]["digest"] == d2 and st["previous"]["outcome"] == "RolledBack"
    assert env.modules() == {"support": uri1.removeprefix("file://")}
    wait_for(lambda: env.served() == [{"support"}, {"support"}], 30)
    assert rollbacks("support", "ProgressDeadlineExceeded") == before + 1
    # Not retried while the spec stays the same.
    assert env.status("support")["phase"] == "RolledBack"
    assert [h["outcome"] for h in env.status("support")["history"]] == ["Available", "RolledBack"]
    # Later passes keep reporting the restore: scaled up, the Deployment's new replica shows
    # in Available's message, its reason stays PreviousRevisionRestored.
    env.api.merge_patch("deployments", NS, "llm", {"spec": {"replicas": 3}})
    wait_for(
        lambda: "3/3 replicas available" in env.condition("support", "Available")["message"],
        30,
        what=lambda: f"the third replica counted: {env.status('support')}",
    )
    available = env.condition("support", "Available")
    assert available["reason"] == "PreviousRevisionRestored", available
    assert available["message"] == "revision 1 restored: 3/3 replicas available"
    assert env.status("support")["phase"] == "RolledBack"


def test_rank_above_server_maximum_is_refused_with_the_flag(env: Env) -> None:
    uri, digest = make_adapter(env.root, "big", rank=64)
    env.api.create(vllm_deployment())
    untouched = env.deployment()["spec"]
    env.api.create(adapter_deployment("big", uri_source(uri, digest)))
    wait_for(lambda: env.condition("big", "Compatible").get("status") == "False", 10)
    cond = env.condition("big", "Compatible")
    assert cond["reason"] == "RankTooLarge"
    assert (
        "set --max-lora-rank 64" in cond["message"] and "allowServerArgChanges" in cond["message"]
    )
    assert env.status("big")["phase"] == "Failed"
    assert env.deployment()["spec"] == untouched  # never rolled out

    env.set_spec(
        "big", {"target": {"deployment": "llm", "container": "vllm", "allowServerArgChanges": True}}
    )
    env.wait_phase("big", "Available")
    container = env.deployment()["spec"]["template"]["spec"]["containers"][0]
    assert vllm_args.parse_container(container).max_lora_rank == 64
    assert env.served() == [{"big"}, {"big"}]


def test_gates_not_passed_is_refused(env: Env) -> None:
    uri, digest = make_adapter(env.root, "gated")
    env.api.create(vllm_deployment())
    env.api.create(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tune", "namespace": NS},
            "spec": {},
            "status": {
                "phase": "Succeeded",
                "conditions": [{"type": "GatesPassed", "status": "False", "reason": "GatesFailed",
                                "message": "1/2 passed: rougeL 0.41 < 0.65 (short by 0.24)"}],
                "adapter": {"uri": uri, "digest": digest, "rank": 8, "baseModel": "hf://org/tiny-base"},
            },
        },
        keep_status=True,
    )  # fmt: skip
    untouched = env.deployment()["spec"]
    env.api.create(adapter_deployment("gated", {"fineTuneJobRef": {"name": "tune"}}))
    wait_for(lambda: env.condition("gated", "SourceReady").get("status") == "False", 10)
    cond = env.condition("gated", "SourceReady")
    assert cond["reason"] == "GatesFailed"
    assert "rougeL 0.41 < 0.65" in cond["message"] and "requireGates: false" in cond["message"]
    assert env.status("gated")["phase"] == "Failed"
    assert env.deployment()["spec"] == untouched

    env.set_spec("gated", {"requireGates": False})
    env.wait_phase("gated", "Available")
    assert env.modules() == {"gated": uri.removeprefix("file://")}


def test_two_adapters_on_one_deployment_keep_both_entries(env: Env) -> None:
    (ua, da), (ub, db) = make_adapter(env.root, "a"), make_adapter(env.root, "b")
    env.api.create(vllm_deployment(extra=["--max-loras", "2"]))
    # Make the first JSON patch of the Deployment lose a race (409), as under real contention.
    fault = env.api.inject_fault("deployments", 409, count=1)

    def create(name: str, uri: str, digest: str) -> None:
        env.api.create(adapter_deployment(name, uri_source(uri, digest)))

    threads = [
        threading.Thread(target=create, args=a) for a in (("team-a", ua, da), ("team-b", ub, db))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    env.wait_phase("team-a", "Available")
    env.wait_phase("team-b", "Available")
    assert fault.remaining == 0  # one patch lost the race and was rebuilt from a fresh read
    wait_for(lambda: env.served() == [{"team-a", "team-b"}] * 2, 20)
    assert env.modules() == {
        "team-a": ua.removeprefix("file://"),
        "team-b": ub.removeprefix("file://"),
    }
    annotations = env.deployment()["metadata"]["annotations"]
    assert annotations[sb.owner_annotation("team-a")] == "team-a"
    assert annotations[sb.owner_annotation("team-b")] == "team-b"

    # Deleting one AdapterDeployment removes only its own entry.
    env.api.request_delete("adapterdeployments", NS, "team-a")
    wait_for(lambda: env.modules() == {"team-b": ub.removeprefix("file://")}, 20)
    assert sb.owner_annotation("team-a") not in env.deployment()["metadata"]["annotations"]
    env.wait_phase("team-b", "Available")


def test_adapter_name_taken_by_another_adapterdeployment(env: Env) -> None:
    ua, da = make_adapter(env.root, "a")
    env.api.create(vllm_deployment(extra=["--max-loras", "2"]))
    env.api.create(adapter_deployment("first", uri_source(ua, da), adapter="shared"))
    env.wait_phase("first", "Available")
    env.api.create(adapter_deployment("second", uri_source(ua, da), adapter="shared"))
    wait_for(lambda: env.condition("second", "Compatible").get("reason") == "AdapterNameTaken", 10)
    assert (
        "AdapterDeployment first already serves adapterName shared"
        in env.condition("second", "Compatible")["message"]
    )


# ---------------------------------------------------------------------------- Canary


def test_canary_promoted(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")

    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": canary_strategy()})
    canary = wait_for(lambda: env.api.read("deployments", NS, "support-canary"), 10)
    owner = canary["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "AdapterDeployment",
        "support",
        True,
    )
    assert canary["spec"]["replicas"] == 1
    assert canary["spec"]["template"]["metadata"]["labels"] == {
        "app": "llm",
        sb.CANARY_LABEL: "support",
    }
    env.wait_phase("support", "Analyzing")
    # While analysing, the target still serves v1.
    assert env.modules() == {"support": uri1.removeprefix("file://")}
    env.wait_available_at("support", d2, 30)
    st = env.status("support")
    assert st["canary"]["checksPassed"] == 2 and st["canary"]["requests"] >= 8
    assert st["canary"]["revision"]["outcome"] == "Promoted"
    assert "deployment" not in st["canary"]
    assert env.modules() == {"support": uri2.removeprefix("file://")}
    wait_for(lambda: env.api.read("deployments", NS, "support-canary") is None, 10)
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Superseded"),
        (2, "Available"),
    ]


@pytest.mark.parametrize(
    ("fault", "analysis", "reason", "needle"),
    [
        ({"error_rate": 0.5}, {}, "CanaryErrorRate", "above maxErrorRate 10.0%"),
        (
            {"added_latency_seconds": 0.35},
            {"maxLatencyP95Ms": 300},
            "CanaryLatency",
            "above maxLatencyP95Ms 300",
        ),
    ],
)
def test_canary_aborted(env: Env, fault: dict, analysis: dict, reason: str, needle: str) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.behaviors[d2] = fault  # type: ignore[attr-defined]
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    before = rollbacks("support", reason)

    env.set_spec(
        "support", {"source": uri_source(uri2, d2), "strategy": canary_strategy(**analysis)}
    )
    st = env.wait_phase("support", "RolledBack", timeout=30)
    degraded = env.condition("support", "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == reason
    assert needle in degraded["message"]
    assert st["current"]["digest"] == d1  # the target never changed
    assert env.modules() == {"support": uri1.removeprefix("file://")}
    assert st["canary"]["revision"]["outcome"] == "CanaryAborted"
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Available"),
        (2, "CanaryAborted"),
    ]
    wait_for(lambda: env.api.read("deployments", NS, "support-canary") is None, 10)
    assert rollbacks("support", reason) == before + 1
    if reason == "CanaryErrorRate":
        assert st["canary"]["errorRate"] == pytest.approx(0.5)
    else:
        assert st["canary"]["latencyP95Ms"] > 300


# ---------------------------------------------------------------------------- Runtime


def test_runtime_load_reload_after_restart_and_scale_up(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    wait_for(lambda: len(env.cluster.servers("llm")) == 2, 30)
    template = env.deployment()["spec"]["template"]
    env.api.create(adapter_deployment("support", uri_source(uri1, d1), strategy=runtime_strategy()))
    st = env.wait_phase("support", "Available")
    assert env.served() == [{"support"}, {"support"}]
    assert sorted(p["digest"] for p in st["pods"]) == [d1, d1]

    pod = sorted(env.cluster.pods)[0]
    before = env.cluster.pods[pod].server
    env.cluster.restart_pod(pod)
    fresh = env.cluster.pods[pod].server
    # A fresh server holds static adapters only: the operator must load the adapter again
    # (it may already have by the time this line runs, so the load is what is checked).
    assert fresh is not before and env.cluster.pods[pod].restarts == 1
    wait_for(
        lambda: fresh.adapters.get("support") == uri1.removeprefix("file://"),
        30,  # pods restart and start: slow on a loaded 2-core machine
    )
    assert "POST /v1/load_lora_adapter" in fresh.requests_seen

    env.api.merge_patch("deployments", NS, "llm", {"spec": {"replicas": 3}})
    wait_for(lambda: env.served() == [{"support"}] * 3, 30)
    wait_for(
        lambda: (
            sorted(p.get("digest", "") for p in env.status("support").get("pods") or []) == [d1] * 3
        ),
        30,  # pods restart and start: slow on a loaded 2-core machine
    )

    env.set_spec("support", {"source": uri_source(uri2, d2)})
    env.wait_available_at("support", d2, 30)
    assert {s.adapters["support"] for s in env.cluster.servers("llm")} == {
        uri2.removeprefix("file://")
    }
    assert env.deployment()["spec"]["template"] == template  # no restart, no template change


def test_runtime_needs_runtime_updates_enabled(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment(runtime_updates=False))
    env.api.create(
        adapter_deployment("support", uri_source(uri, digest), strategy=runtime_strategy())
    )
    wait_for(
        lambda: env.condition("support", "Compatible").get("reason") == "RuntimeUpdatesDisabled", 10
    )
    assert (
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in env.condition("support", "Compatible")["message"]
    )
    assert env.status("support")["phase"] == "Failed"


def test_runtime_load_failure_rolls_back(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "bad", rank=8, config_rank=64)
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1), strategy=runtime_strategy()))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2)})
    env.wait_phase("support", "RolledBack")
    degraded = env.condition("support", "Degraded")
    assert (
        degraded["reason"] == "LoadFailed"
        and "greater than max_lora_rank 16" in degraded["message"]
    )
    wait_for(
        lambda: env.condition("support", "Available").get("reason") == "PreviousRevisionRestored",
        10,
    )
    assert {s.adapters.get("support") for s in env.cluster.servers("llm")} == {
        uri1.removeprefix("file://")
    }


def test_rollback_to_an_earlier_revision(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2)})
    env.wait_available_at("support", d2, 20)

    env.set_spec("support", {"rollback": {"toRevision": 1}})
    env.wait_available_at("support", d1, 20)
    st = env.status("support")
    assert st["current"]["revision"] == 3  # a new revision serving revision 1's adapter
    assert env.condition("support", "SourceReady")["reason"] == "RollbackToRevision"
    assert env.modules() == {"support": uri1.removeprefix("file://")}

    env.set_spec("support", {"rollback": {"toRevision": 9}})
    wait_for(
        lambda: env.condition("support", "SourceReady").get("reason") == "RevisionNotFound", 10
    )
    assert "have: 1, 2, 3" in env.condition("support", "SourceReady")["message"]
    assert env.status("support")["phase"] == "Available"  # revision 3 keeps serving


def test_without_automatic_rollback_the_failure_is_left_for_a_human(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "good")
    uri2, d2 = make_adapter(env.root, "bad", rank=8, config_rank=64)
    env.api.create(vllm_deployment())
    env.api.create(
        adapter_deployment("support", uri_source(uri1, d1), rollback={"automatic": False})
    )
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2)})
    st = env.wait_phase("support", "Degraded")
    assert st["current"]["digest"] == d2 and st["current"]["outcome"] == "Failed"
    assert "rollback.automatic is off" in env.condition("support", "Degraded")["message"]
    assert env.modules() == {"support": uri2.removeprefix("file://")}  # left as it is
    # The old pods keep serving (maxUnavailable 0): only the new ones fail to start.
    assert any(
        s.adapters.get("support") == uri1.removeprefix("file://")
        for s in env.cluster.servers("llm")
    )


def test_invalid_spec_is_reported(env: Env) -> None:
    env.api.create(adapter_deployment("broken", {}))
    wait_for(lambda: env.condition("broken", "SourceReady").get("reason") == "InvalidSpec", 10)
    assert (
        "set exactly one of fineTuneJobRef, uri or fineTuneScheduleRef"
        in env.condition("broken", "SourceReady")["message"]
    )
    assert env.status("broken")["phase"] == "Failed"


def test_canary_resumes_after_an_operator_restart(env: Env, operator_runner) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": canary_strategy(checks=3)})
    env.wait_phase("support", "Analyzing")
    first = env.operator  # type: ignore[attr-defined]
    first.stop()
    assert env.api.read("deployments", NS, "support-canary") is not None
    start_serving_operator(operator_runner)
    env.wait_available_at("support", d2, 30)
    assert env.status("support")["canary"]["checksPassed"] == 3
    wait_for(lambda: env.api.read("deployments", NS, "support-canary") is None, 10)
