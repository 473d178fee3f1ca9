"""Installing from the chart or the plain manifests: objects in dependency order, a missing
watch namespace refused before anything is created, and the release namespace's Pod Security
level named when it has none. Cluster-aware renders run against the embedded API server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from finetune_local import Emulator
from support.chartlib import CHART_DIR, NAMESPACE, RELEASE, ROOT, load_script, manifests

helm = pytest.importorskip("helm_python")

DEPLOY = ROOT / "deploy" / "finetune-operator.yaml"


def deploy_kinds() -> list[str]:
    return [doc["kind"] for doc in yaml.safe_load_all(DEPLOY.read_text()) if doc]


def test_plain_manifests_create_what_an_object_needs_before_it() -> None:
    kinds = deploy_kinds()
    assert kinds[0] == "Namespace"
    before = {
        "ServiceAccount": "Deployment",
        "ConfigMap": "Deployment",
        "ClusterRole": "ClusterRoleBinding",
        "ClusterRoleBinding": "Deployment",
    }
    for first, then in before.items():
        last_first = max(i for i, k in enumerate(kinds) if k == first)
        assert last_first < kinds.index(then), f"{first} comes after {then}: {kinds}"
    order = load_script("render_deploy").INSTALL_ORDER
    ranks = [order.index(k) for k in kinds]
    assert ranks == sorted(ranks), kinds


def test_plain_manifests_namespace_enforces_restricted() -> None:
    namespace = next(d for d in yaml.safe_load_all(DEPLOY.read_text()) if d)
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.fixture
def live_render(emulator: Emulator) -> Iterator[Any]:
    """Render as `helm install` does against a cluster: `lookup` reads the live API."""
    config = helm.Config(kube_apiserver=str(emulator.url), kube_insecure_skip_tls_verify=True)

    def render(values: dict[str, Any]) -> dict[str, str]:
        with helm.Chart.load(CHART_DIR) as chart:
            rendered: dict[str, str] = config.render(
                chart, values, name=RELEASE, namespace=NAMESPACE, is_install=True
            )
        return rendered

    yield render


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def test_missing_watch_namespace_is_refused_before_anything_is_created(
    emulator: Emulator,
    live_render: Any,
) -> None:
    emulator.create(namespace("team-a"))
    with pytest.raises(helm.HelmRenderError) as refused:
        live_render({"watchNamespaces": ["team-a", "wb", "wc"]})
    message = str(refused.value)
    assert "watchNamespaces names namespaces that do not exist: wb, wc." in message
    assert "kubectl create namespace wb wc" in message
    # Helm renders every template before it creates anything: a failed render makes nothing.
    names = {n["metadata"]["name"] for n in emulator.read_all("namespaces")}
    assert names == {"default", "kube-system", "team-a"}
    rendered = live_render({"watchNamespaces": ["team-a"]})
    assert "Role" in "".join(rendered.values())


def test_without_a_cluster_the_namespace_check_is_skipped() -> None:
    objects = manifests({"watchNamespaces": ["not-created-anywhere"]})
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] == "Role"} == {
        "not-created-anywhere",
        NAMESPACE,
    }


def test_notes_ask_to_label_an_unlabelled_release_namespace(
    emulator: Emulator,
    live_render: Any,
) -> None:
    notes = "finetune-operator/templates/NOTES.txt"
    emulator.create(namespace(NAMESPACE))  # as helm --create-namespace makes it
    hint = f"kubectl label namespace {NAMESPACE} pod-security.kubernetes.io/enforce=restricted"
    assert hint in live_render({})[notes]
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    emulator.merge_patch("namespaces", None, NAMESPACE, {"metadata": {"labels": labels}})
    assert hint not in live_render({})[notes]
