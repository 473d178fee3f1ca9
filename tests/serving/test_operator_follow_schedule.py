"""An AdapterDeployment following a FineTuneSchedule, with the real operator (the serving
and the schedule controllers together) against the embedded API and vLLM-compatible pods.
The schedule's champion is written to its status as its controller would after a run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from finetune_local import Emulator
from finetune_local.serving_cluster import ServingCluster
from support.adapters import make_adapter
from support.ftj_samples import spec as ftj_spec
from support.k8s_fixtures import wait_for
from support.serving_env import (
    NS,
    Env,
    adapter_deployment,
    canary_strategy,
    vllm_deployment,
)

BASE_MODEL = "hf://org/tiny-base"


@pytest.fixture
def env(emulator: Emulator, operator_runner: Any, tmp_path: Path) -> Iterator[Env]:
    """Every handler of the operator pod; adapters' digests may carry serving faults."""
    import finetune_operator.main  # noqa: F401  (every handler)
    from finetune_operator.clients.kube import KubeClient
    from support.cluster import FAST

    behaviors: dict[str, dict[str, Any]] = {}

    def behavior(_dep: str, template: dict[str, Any]) -> dict[str, Any]:
        digests = set(((template.get("metadata") or {}).get("annotations") or {}).values())
        out: dict[str, Any] = {}
        for digest in digests:
            out.update(behaviors.get(digest, {}))
        return out

    with ServingCluster(emulator, NS, tmp_path / "pvc", behavior) as cluster:
        memo = kopf.Memo(config=FAST, kube=KubeClient.from_url(str(emulator.url)))
        operator_runner(memo=memo, namespaces=[NS])
        e = Env(emulator, cluster, tmp_path)
        e.behaviors = behaviors  # type: ignore[attr-defined]
        yield e


def create_schedule(env: Env) -> None:
    """A suspended schedule: it starts no run, and still reads its followers."""
    env.api.create(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneSchedule",
            "metadata": {"name": "weekly", "namespace": NS},
            "spec": {
                "schedule": "0 2 * * MON",
                "timeZone": "UTC",
                "suspend": True,
                "jobTemplate": {"spec": ftj_spec()},
            },
        },
        keep_status=False,
    )


def promote(env: Env, run: str, uri: str, digest: str) -> None:
    """What the schedule controller writes when a run becomes the champion."""
    champion = {
        "job": run,
        "adapter": {"uri": uri, "digest": digest, "baseModel": BASE_MODEL, "rank": 8},
        "since": "2026-12-07T02:00:00Z",
    }
    env.api.patch_status("finetuneschedules", NS, "weekly", {"champion": champion})


def schedule_condition(env: Env, type_: str) -> dict[str, Any]:
    obj = env.api.read("finetuneschedules", NS, "weekly") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def serving(env: Env, digest: str) -> dict[str, Any] | None:
    st = env.status("support")
    current = st.get("current") or {}
    done = st.get("phase") == "Available" and current.get("digest") == digest
    return st if done else None


def test_a_follower_rolls_out_each_champion_and_never_retries_a_rejected_one(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "run-1")
    uri2, d2 = make_adapter(env.root, "run-2")
    uri3, d3 = make_adapter(env.root, "run-3")
    env.behaviors[d3] = {"error_rate": 0.5}  # type: ignore[attr-defined]
    env.api.create(vllm_deployment())
    env.api.create(
        adapter_deployment(
            "support", {"fineTuneScheduleRef": {"name": "weekly"}}, strategy=canary_strategy()
        )
    )
    # No schedule yet, then no champion yet: a wait, not a failure.
    wait_for(
        lambda: env.condition("support", "SourceReady").get("reason") == "FineTuneScheduleNotFound",
        10,
    )
    assert env.status("support")["phase"] == "Pending"
    create_schedule(env)
    wait_for(lambda: env.condition("support", "SourceReady").get("reason") == "NoChampion", 10)
    assert env.status("support")["phase"] == "Pending"
    assert env.api.read("deployments", NS, "support-canary") is None

    # The first champion is rolled out (through a canary, as the strategy says).
    promote(env, "weekly-run-1", uri1, d1)
    st = wait_for(
        lambda: serving(env, d1), 30, what=lambda: f"champion 1 served: {env.status('support')}"
    )
    assert st["canary"]["revision"]["outcome"] == "Promoted"
    assert env.modules() == {"support": uri1.removeprefix("file://")}

    # A new champion: a new canary, then revision 2 serves.
    promote(env, "weekly-run-2", uri2, d2)
    st = wait_for(
        lambda: serving(env, d2), 30, what=lambda: f"champion 2 served: {env.status('support')}"
    )
    assert (st["current"]["revision"], st["canary"]["revision"]["revision"]) == (2, 2)
    assert env.modules() == {"support": uri2.removeprefix("file://")}

    # A champion whose canary fails is rolled back; the schedule shows it.
    promote(env, "weekly-run-3", uri3, d3)
    env.wait_phase("support", "RolledBack", timeout=30)
    rolled_back = wait_for(
        lambda: (
            schedule_condition(env, "PromotionRolledBack").get("status") == "True"
            and schedule_condition(env, "PromotionRolledBack")
        ),
        10,
        what=lambda: f"PromotionRolledBack: {schedule_condition(env, 'PromotionRolledBack')}",
    )
    assert rolled_back["reason"] == "CanaryAborted"
    message = rolled_back["message"]
    assert "AdapterDeployment support rejected the champion weekly-run-3" in message
    assert "revision 3 not promoted" in message  # the follower's Degraded message: why
    champion = (env.api.read("finetuneschedules", NS, "weekly") or {})["status"]["champion"]
    assert champion["rolledBack"] == {"adapterDeployment": "support", "reason": "CanaryAborted"}
    # The follower waits for the next champion; the rejected one is not tried again.
    wait_for(
        lambda: env.condition("support", "SourceReady").get("reason") == "ChampionRolledBack", 10
    )
    wait_for(lambda: env.api.read("deployments", NS, "support-canary") is None, 10)
    st = env.status("support")
    assert st["phase"] == "RolledBack" and st["current"]["digest"] == d2
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Superseded"),
        (2, "Available"),
        (3, "CanaryAborted"),
    ]
    assert env.modules() == {"support": uri2.removeprefix("file://")}
    assert env.api.read("deployments", NS, "support-canary") is None


def test_only_a_new_champion_wakes_a_follower_and_an_idle_one_sends_nothing(
    emulator: Emulator, operator_runner: Any, tmp_path: Path
) -> None:
    """The serving controller alone, polling once an hour: the champion's change is a watch
    event that starts the rollout; the schedule's other status changes (its runs come and
    go) and an idle follower cost no request."""
    import finetune_operator.handlers.adapterdeployment as handlers
    from support.cluster import FAST

    config = dataclasses.replace(FAST, serving_poll_seconds=3600, serving_max_backoff_seconds=3600)
    with ServingCluster(emulator, NS, tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        operator_runner(handlers, memo=kopf.Memo(config=config))
        env = Env(emulator, cluster, tmp_path)
        uri1, d1 = make_adapter(tmp_path, "run-1")
        uri2, d2 = make_adapter(tmp_path, "run-2")
        create_schedule(env)
        env.api.create(vllm_deployment())
        env.api.create(adapter_deployment("support", {"fineTuneScheduleRef": {"name": "weekly"}}))
        env.wait_phase("support", "Pending")
        promote(env, "weekly-run-1", uri1, d1)
        wait_for(
            lambda: serving(env, d1), 20, what=lambda: f"champion 1 served: {env.status('support')}"
        )
        time.sleep(1.0)  # the last status writes and their echoes
        env.api.reset_counters()
        env.api.patch_status(
            "finetuneschedules", NS, "weekly", {"lastScheduleTime": "2026-12-07T02:00:00Z"}
        )
        time.sleep(2.0)
        sent = {key: n for key, n in env.api.request_counts.items() if key[0] != "watch"}
        assert sent == {}, f"an idle follower sent requests: {sent}"
        promote(env, "weekly-run-2", uri2, d2)
        wait_for(
            lambda: serving(env, d2), 20, what=lambda: f"champion 2 served: {env.status('support')}"
        )
        assert env.modules() == {"support": uri2.removeprefix("file://")}
