"""An operator limited to namespaces asks for nothing cluster-wide: no namespace or CRD
listings its Roles would refuse (kopf retries each refusal for about a minute before it
handles any object). The refusals are played by the embedded API as the chart's RBAC would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from finetune_local import Emulator
from finetune_local.resources import ResourceType
from finetune_local.runner import test_settings as harness_settings
from finetune_operator.cli import operator_settings
from finetune_operator.clients.kube import KubeClient
from support.cluster import FAST, NS, add_prerequisites, ftj_body, wait_phase
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for

CRDS = ResourceType(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
    namespaced=False,
)  # fmt: skip
CLUSTER_WIDE = (("namespaces", "list"), ("namespaces", "watch"))
CLUSTER_WIDE += (("customresourcedefinitions", "list"), ("customresourcedefinitions", "watch"))


@pytest.fixture
def namespaced_rbac(emulator: Emulator) -> Iterator[Emulator]:
    """What the namespaced install allows: nothing cluster-wide (403), the rest as usual."""
    emulator.add_resource(CRDS)
    for resource, verb in CLUSTER_WIDE:
        emulator.inject_fault(resource, 403, count=10**6, verbs=(verb,), message="forbidden")
    add_prerequisites(emulator)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    yield emulator


def cluster_wide_requests(emulator: Emulator) -> dict[tuple[str, str], int]:
    return {
        (resource, verb): emulator.count(verb=verb, resource=resource)
        for resource, verb in CLUSTER_WIDE
        if emulator.count(verb=verb, resource=resource)
    }


def settings_for(namespaces: list[str]) -> kopf.OperatorSettings:
    """The operator's scanning choice for these namespaces, with the harness's short timeouts
    and retries (kopf's defaults allow 600 s to exit, past the harness's 20 s wait for a
    stop, and retry a refused request for 54 s)."""
    settings = harness_settings()
    settings.scanning.disabled = operator_settings(namespaces).scanning.disabled
    return settings


def start(emulator: Emulator, operator_runner: Any, settings: kopf.OperatorSettings) -> None:
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(config=FAST, kube=KubeClient.from_url(str(emulator.url)))
    operator_runner(memo=memo, namespaces=[NS], settings=settings)


def test_settings_turn_scanning_off_only_for_exact_namespaces() -> None:
    assert operator_settings([NS, "team-b"]).scanning.disabled is True
    assert operator_settings([]).scanning.disabled is False  # cluster-wide: CRD watch allowed
    assert operator_settings(["team-*"]).scanning.disabled is False  # patterns need the list


def test_namespaced_operator_reconciles_without_cluster_wide_requests(
    namespaced_rbac: Emulator, operator_runner: Any
) -> None:
    start(namespaced_rbac, operator_runner, settings_for([NS]))
    wait_phase(namespaced_rbac, "bot", "Pending")
    assert cluster_wide_requests(namespaced_rbac) == {}


def test_with_kopf_scanning_on_the_namespaced_operator_is_refused(
    namespaced_rbac: Emulator, operator_runner: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The same setup with kopf's default scanning: it asks, is refused and retries (here with
    short backoffs; kopf's defaults add up to 54 s)."""
    settings = settings_for([NS])
    settings.scanning.disabled = False
    settings.networking.error_backoffs = [0.05, 0.05]
    start(namespaced_rbac, operator_runner, settings)
    wait_phase(namespaced_rbac, "bot", "Pending")
    refused = cluster_wide_requests(namespaced_rbac)
    assert refused.get(("namespaces", "list"), 0) >= 1, refused
    # Stop only once kopf has given up on both watches: a stop during its retries can leave
    # a retrying request that outlives the operator's shutdown.
    gave_up = ("to watch for namespaces", "to watch for resources")
    wait_for(
        lambda: all(
            any(phrase in record.getMessage() for record in caplog.records) for phrase in gave_up
        ),
        what="kopf to give up watching namespaces and CRDs",
    )
