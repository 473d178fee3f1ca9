"""Cross-check of the RBAC scan at runtime: the real operator (kopf and both controllers) runs
against the embedded API server, and every request it sends must be allowed by the chart's
ClusterRole. This catches what a static scan cannot see, such as kopf's own requests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from finetune_local import Emulator
from rbaclib import granted, permission_of
from support.adapters import make_adapter
from support.chartlib import manifests, one
from support.cluster import (
    add_prerequisites,
    ftj_body,
    start_operator,
    start_pod,
    wait_job,
    wait_phase,
)
from support.ftj_samples import DATA_REPORT, channel, progress_line, result, spec
from support.k8s_fixtures import wait_for
from support.serving_env import (
    Env,
    adapter_deployment,
    canary_strategy,
    uri_source,
    vllm_deployment,
)

# Renders the chart and runs the operator through whole rollouts.
pytestmark = pytest.mark.slow

pytest.importorskip("helm_python")

# kopf tries these when it watches a list of namespaces (as in this test) and falls back
# quietly on 403, which is the designed behaviour of the namespaced install.
KOPF_OPTIONAL = {
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
}


def requested(api: Emulator) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every resource request the server received."""
    triples: set[tuple[str, str, str]] = set()
    for request in list(api):
        path = request.url.path
        if not path.startswith(("/api/v1/", "/apis/")) or path.count("/") < 4:
            continue  # discovery and version probes: open to every authenticated client
        query = "watch=true" if str(request.params.get("watch", "")) in ("true", "1") else ""
        triples.add(permission_of(request.method.value, path, query))
    return triples


def test_a_finetunejob_lifecycle_needs_nothing_the_chart_does_not_grant(
    emulator: Emulator,
    operator_runner: Any,
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    job = wait_job(emulator, "bot-train-g1")
    pod = start_pod(emulator, job)
    emulator.set_pod_log(
        "default",
        pod,
        "\n".join([channel({"type": "data", "report": DATA_REPORT}), progress_line(5, 10)]) + "\n",
    )
    emulator.terminate_container(
        "default", pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished("default", "bot-train-g1", succeeded=True)
    wait_phase(emulator, "bot", "Succeeded")
    emulator.request_delete("finetunejobs", "default", "bot")
    wait_for(lambda: emulator.read("finetunejobs", "default", "bot") is None, what="deletion")

    needed = requested(emulator)
    assert ("", "pods/log", "get") in needed, "the run did not get as far as reading the log"
    assert_allowed(needed)


def assert_allowed(needed: set[tuple[str, str, str]]) -> None:
    allowed = granted(one(manifests(), "ClusterRole", "fto-finetune-operator")["rules"])
    missing = needed - allowed - KOPF_OPTIONAL
    assert not missing, f"the operator sent requests its ClusterRole forbids: {sorted(missing)}"


@pytest.fixture
def env(
    emulator: Emulator,
    operator_runner: Any,
    tmp_path: Path,
) -> Iterator[Env]:
    """The whole operator (both controllers, as in the pod) next to an emulated vLLM fleet."""
    import finetune_operator.main  # noqa: F401  (registers every handler)
    from finetune_local.serving_cluster import ServingCluster
    from finetune_operator.clients.kube import KubeClient
    from support.cluster import FAST

    with ServingCluster(emulator, "default", tmp_path / "pvc", lambda _d, _t: {}) as cluster:
        memo = kopf.Memo(config=FAST, kube=KubeClient.from_url(str(emulator.url)))
        operator_runner(memo=memo, namespaces=["default"])
        yield Env(emulator, cluster, tmp_path)


def test_a_canary_rollout_needs_nothing_the_chart_does_not_grant(env: Env) -> None:
    uri1, d1 = make_adapter(env.root, "v1")
    uri2, d2 = make_adapter(env.root, "v2")
    env.api.create(vllm_deployment())
    env.api.create(adapter_deployment("support", uri_source(uri1, d1)))
    env.wait_phase("support", "Available")
    env.set_spec("support", {"source": uri_source(uri2, d2), "strategy": canary_strategy()})
    env.wait_available_at("support", d2, 30)
    wait_for(lambda: env.api.read("deployments", "default", "support-canary") is None, 10)
    env.api.request_delete("adapterdeployments", "default", "support")
    wait_for(lambda: env.api.read("adapterdeployments", "default", "support") is None, 10)

    needed = requested(env.api)
    assert {("apps", "deployments", "create"), ("apps", "deployments", "delete")} <= needed, (
        "the rollout did not create and remove a canary"
    )
    assert_allowed(needed)
