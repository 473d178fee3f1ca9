"""A serving pod lost during a canary: the canary pod's server restarts mid-analysis. Its
request counters start again from zero; the design (decision 0501) takes a counter that went
down as a restart and the new total as the window, so analysis continues and a healthy canary
is promoted, with no rollback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from support.adapters import make_adapter
from support.k8s_fixtures import wait_for
from support.serving_env import (
    NS,
    Env,
    adapter_deployment,
    canary_strategy,
    env_with_every_handler,
    uri_source,
    vllm_deployment,
)

# Each scenario waits out a canary analysis deadline (seconds of real time).
pytestmark = pytest.mark.slow


@pytest.fixture
def env(
    emulator: Emulator,
    operator_runner: Any,
    tmp_path: Path,
) -> Iterator[Env]:
    yield from env_with_every_handler(emulator, operator_runner, tmp_path)


def test_canary_pod_restart_mid_analysis_is_not_a_failure(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": canary_strategy(checks=3)})
    wait_for(
        lambda: (env.status("support").get("canary") or {}).get("checksPassed", 0) >= 1,
        30,
        what=lambda: f"a first passed check: {env.status('support')}",
    )
    canary_pods = [n for n, p in env.cluster.pods.items() if p.deployment == "support-canary"]
    assert canary_pods
    # Keep the pod object: after promotion the canary Deployment and its pods go away.
    restarted = env.cluster.pods[canary_pods[0]]
    env.cluster.restart_pod(canary_pods[0])
    env.wait_available_at("support", d2, 40)
    st = env.status("support")
    assert st["canary"]["revision"]["outcome"] == "Promoted"
    assert st["canary"]["checksPassed"] == 3
    assert restarted.restarts == 1
    assert env.modules() == {"support": uri2.removeprefix("file://")}
    assert not any(
        c["type"] == "Degraded" and c["status"] == "True" for c in st.get("conditions") or []
    )


def _lose_the_canary_pod_mid_analysis(env: Env, deadline: int) -> tuple[str, str, str]:
    """Roll out v1, start a canary of v2, and once a check has passed and the canary is
    older than its progress deadline, lose its only pod with no node to replace it on."""
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    # Five checks four seconds apart: the analysis outlasts the deadline counted from its start.
    strategy = canary_strategy(checks=5, intervalSeconds=4)
    strategy["progressDeadlineSeconds"] = deadline  # the least the API allows is 10
    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": strategy})
    wait_for(
        lambda: (env.status("support").get("canary") or {}).get("checksPassed", 0) >= 1,
        30,
        what=lambda: f"a first passed check: {env.status('support')}",
    )
    started = datetime.fromisoformat(env.status("support")["canary"]["startedAt"])
    # Past the deadline counted from the canary's start: a lost pod must not abort it by that.
    while (datetime.now(UTC) - started).total_seconds() <= deadline + 0.5:
        time.sleep(0.1)
    env.cluster.hold_new_pods("support-canary")
    (pod,) = [n for n, p in env.cluster.pods.items() if p.deployment == "support-canary"]
    env.cluster.lose_pod(pod)
    return d1, d2, uri2


def test_canary_pod_lost_then_replaced_resumes_the_analysis(env: Env) -> None:
    """The canary's pod is lost mid-analysis and its replacement waits for a node: analysis
    pauses (condition CanaryUnavailable, status.canary.unavailableSince) and resumes once the
    replacement is ready, within progressDeadlineSeconds from the loss; the canary is then
    promoted. The deadline counted from the canary's start has long passed by then."""
    _d1, d2, uri2 = _lose_the_canary_pod_mid_analysis(env, deadline=10)
    # The deadline counts from when the operator sees the loss, so a slow machine may take
    # longer to see it without changing the outcome.
    paused = wait_for(
        lambda: env.status("support")
        if (env.status("support")["canary"].get("unavailableSince")) else None,
        30,
        what=lambda: f"analysis paused: {env.status('support')}",
    )  # fmt: skip
    assert paused["phase"] == "Analyzing"
    progressing = env.condition("support", "Progressing")
    assert progressing["reason"] == "CanaryUnavailable"
    time.sleep(1.0)
    env.cluster.release_pods("support-canary")
    env.wait_available_at("support", d2, 40)
    st = env.status("support")
    assert st["canary"]["revision"]["outcome"] == "Promoted"
    assert "unavailableSince" not in st["canary"]
    assert env.modules() == {"support": uri2.removeprefix("file://")}
    assert not any(
        c["type"] == "Degraded" and c["status"] == "True" for c in st.get("conditions") or []
    )


def test_canary_pod_lost_for_good_rolls_back(env: Env) -> None:
    """The lost pod's replacement never becomes ready: after progressDeadlineSeconds from
    the loss the canary is aborted with reason CanaryUnavailable; the target never changed,
    the canary Deployment is removed and the revision is recorded as CanaryAborted."""
    d1, _d2, _uri2 = _lose_the_canary_pod_mid_analysis(env, deadline=10)
    st = env.wait_phase("support", "RolledBack", timeout=30)
    degraded = env.condition("support", "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "CanaryUnavailable"
    assert "did not recover within 10s" in degraded["message"]
    assert st["current"]["digest"] == d1
    assert st["canary"]["revision"]["outcome"] == "CanaryAborted"
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Available"),
        (2, "CanaryAborted"),
    ]
    wait_for(lambda: env.api.read("deployments", NS, "support-canary") is None, 10)
    reasons = [e["reason"] for e in env.api.events_about(NS, "support")]
    assert "CanaryUnavailable" in reasons
