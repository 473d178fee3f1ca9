"""A Runtime rollout that never completes runs past its progress deadline in the same pass
that sees a pod added: the real operator against the emulated API and reference vLLM
servers. The rollback must leave no pod serving the revision it gave up on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from finetune_operator.domain.times import parse_rfc3339
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

# Waits out a progress deadline of real time (10 s, the smallest the API accepts).
pytestmark = pytest.mark.slow

DEADLINE = 10


@pytest.fixture
def env(emulator: Emulator, operator_runner: Any, tmp_path: Path) -> Iterator[Env]:
    with ServingCluster(emulator, NS, tmp_path / "pvc") as cluster:
        e = Env(emulator, cluster, tmp_path)
        e.operator = start_serving_operator(operator_runner)  # type: ignore[attr-defined]
        yield e


def _hang(env: Env, pod: str) -> None:
    """The pod stays Ready, but its server stops answering (a hung process)."""
    server = env.cluster.pods[pod].server
    assert server is not None
    env.cluster.call(server.stop())


def _adapters(env: Env, pod: str) -> set[str]:
    server = env.cluster.pods[pod].server
    return set(server.adapters) if server is not None else set()


def test_a_runtime_rollout_past_its_deadline_loads_no_pod_added_meanwhile(
    env: Env, operator_runner: Any
) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    wait_for(lambda: len(env.cluster.servers("llm")) == 2, 10)
    answering, hung = sorted(env.cluster.pods)
    _hang(env, hung)  # the rollout can never complete: one pod does not answer
    strategy = {"type": "Runtime", "progressDeadlineSeconds": DEADLINE}
    env.api.create(adapter_deployment("support", uri_source(uri, digest), strategy=strategy))
    wait_for(lambda: "support" in _adapters(env, answering), 10)
    st = env.status("support")
    assert st["phase"] == "Progressing", st
    started = parse_rfc3339(st["rolloutStartedAt"])
    assert started is not None

    # The operator is away (a restart) while the deadline passes and the Deployment gains a
    # pod: its first pass back both finds the deadline passed and the new pod lacking the
    # adapter, which no timing of passes can arrange reliably otherwise.
    env.operator.stop()  # type: ignore[attr-defined]
    env.api.merge_patch("deployments", NS, "llm", {"spec": {"replicas": 3}})
    wait_for(lambda: len(env.cluster.servers("llm")) == 3, 10)
    (added,) = set(env.cluster.pods) - {answering, hung}
    time.sleep(max(0.0, (started - datetime.now(UTC)).total_seconds() + DEADLINE + 1.5))
    start_serving_operator(operator_runner)

    st = env.wait_phase("support", "RolledBack")
    assert st.get("current") is None  # no earlier revision: the adapter is removed
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [(1, "RolledBack")]
    degraded = env.condition("support", "Degraded")
    assert degraded["reason"] == "RolloutDeadlineExceeded", degraded
    wait_for(lambda: not _adapters(env, answering), 10, what="the answering pod unloaded")
    time.sleep(1.0)  # passes that come later load nothing either
    assert {pod: _adapters(env, pod) for pod in (answering, hung, added)} == {
        answering: set(), hung: set(), added: set(),
    }  # fmt: skip
