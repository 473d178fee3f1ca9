"""A serving pod lost during a canary: the canary pod's server restarts mid-analysis. Its
request counters start again from zero; the design (decision 0501) takes a counter that went
down as a restart and the new total as the window, so analysis continues and a healthy canary
is promoted, with no rollback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.local import Emulator
from k8s_fixtures import wait_for
from serving.adapters import make_adapter
from serving.conftest import fast_serving_settings  # noqa: F401  (fixture)
from serving.test_operator_serving import (
    Env,
    adapter_deployment,
    canary_strategy,
    env_with_every_handler,
    uri_source,
    vllm_deployment,
)


@pytest.fixture
def env(
    emulator: Emulator,
    operator_runner: Any,
    fast_serving_settings: None,  # noqa: F811
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
        what=f"a first passed check: {env.status('support')}",
    )
    canary_pods = [n for n, p in env.cluster.pods.items() if p.deployment == "support-canary"]
    assert canary_pods
    # Keep the pod object: after promotion the canary Deployment and its pods go away.
    restarted = env.cluster.pods[canary_pods[0]]
    env.cluster.restart_pod(canary_pods[0])
    wait_for(
        lambda: (
            env.status("support")["phase"] == "Available"
            and env.status("support")["current"]["digest"] == d2
        ),
        40,
        what=f"promotion: {env.status('support')}",
    )
    st = env.status("support")
    assert st["canary"]["revision"]["outcome"] == "Promoted"
    assert st["canary"]["checksPassed"] == 3
    assert restarted.restarts == 1
    assert env.modules() == {"support": uri2.removeprefix("file://")}
    assert not any(
        c["type"] == "Degraded" and c["status"] == "True" for c in st.get("conditions") or []
    )
