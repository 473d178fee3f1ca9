"""Both kinds' events come from one source, as the operator pod runs them (every handler
registered): `kubectl describe` shows `finetune-operator` for a FineTuneJob and for an
AdapterDeployment alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_operator.builders.names import EVENT_SOURCE
from support.adapters import make_adapter
from support.cluster import add_prerequisites, ftj_body, start_pod, wait_job, wait_phase
from support.ftj_samples import result, spec
from support.k8s_fixtures import wait_for
from support.serving_env import (
    NS,
    Env,
    adapter_deployment,
    env_with_every_handler,
    uri_source,
    vllm_deployment,
)


@pytest.fixture
def env(
    emulator: Emulator,
    operator_runner: Any,
    tmp_path: Path,
) -> Iterator[Env]:
    yield from env_with_every_handler(emulator, operator_runner, tmp_path)


def _sources(env: Env, kind: str) -> set[str]:
    return {
        str((e.get("source") or {}).get("component"))
        for e in env.api.read_all("events", NS)
        if (e.get("involvedObject") or {}).get("kind") == kind
    }


def test_events_of_both_kinds_have_one_source(env: Env) -> None:
    uri, digest = make_adapter(env.root, "v1")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri, digest)))
    env.wait_phase("support", "Available")
    wait_for(lambda: _sources(env, "AdapterDeployment"), what="AdapterDeployment events")

    add_prerequisites(env.api)
    env.api.create(ftj_body("bot", spec()), keep_status=False)
    pod = start_pod(env.api, wait_job(env.api, "bot-train-g1"))
    env.api.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    env.api.set_job_finished(NS, "bot-train-g1", succeeded=True)
    wait_phase(env.api, "bot", "Succeeded")
    assert _sources(env, "FineTuneJob") == {EVENT_SOURCE}
    assert _sources(env, "AdapterDeployment") == {EVENT_SOURCE}
