"""Fixtures of the lifecycle suite: the embedded API by default, a real cluster when asked.

See clusterkit.py for what differs between the two; docs/development.md for how to run it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from clusterkit import (
    Cluster,
    Environment,
    Kube,
    Target,
    TargetError,
    fresh_namespace,
    install,
    install_objects,
    operator_service_account,
    release_finalizers,
    target_from_env,
)
from finetune_local import Emulator, ResourceType, run_operator, serve
from finetune_local.resources import DEFAULT_RESOURCES
from finetune_operator.config import OperatorConfig
from support.chartlib import NAMESPACE as RELEASE_NAMESPACE
from support.chartlib import manifests
from support.k8s_fixtures import CRD_DIR

# Cluster-scoped and RBAC kinds the embedded API serves only for this suite, so that the
# install step runs here exactly as on a cluster (the embedded API does not enforce RBAC).
INSTALL_RESOURCES = (
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                 "CustomResourceDefinition", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole",
                 namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                 namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
)  # fmt: skip


def operator_config() -> OperatorConfig:
    return OperatorConfig(
        progress_poll_seconds=0.2,
        metrics_port=0,
        operator_namespace=RELEASE_NAMESPACE,
        status_write_retries=5,
        retry_seconds=0.5,
        unobserved_reconcile_seconds=3.0,
    )


def _prepare(kube: Kube, target: Target) -> Environment:
    rendered = manifests()
    installed = install(kube, install_objects(rendered, RELEASE_NAMESPACE))
    env = Environment(target=target, kube=kube, installed=installed)
    if target.is_cluster:
        namespace, account = operator_service_account(rendered)
        env.operator_token = kube.service_account_token(namespace, account)
    return env


@pytest.fixture(scope="session")
def environment() -> Iterator[Environment]:
    try:
        target = target_from_env(os.environ)
    except TargetError as exc:
        pytest.fail(str(exc), pytrace=False)
    if target.is_cluster:
        assert target.kubeconfig is not None
        yield _prepare(Kube.from_kubeconfig(target.kubeconfig), target)
        return
    api = Emulator(
        resources=(*DEFAULT_RESOURCES, *INSTALL_RESOURCES), crd_dir=CRD_DIR, validate_schemas=True
    )
    with serve(api):
        yield _prepare(Kube.from_url(str(api.url)), target)


@pytest.fixture
def cluster(environment: Environment) -> Iterator[Cluster]:
    """A fresh namespace with the operator watching it; removed after the test."""
    kube = environment.kube
    namespace = kube.create(fresh_namespace())["metadata"]["name"]
    try:
        yield Cluster(kube, namespace, job_controller=environment.target.is_cluster)
    finally:
        release_finalizers(kube, namespace)
        kube.delete("namespaces", None, namespace)


@pytest.fixture
def operator(environment: Environment, cluster: Cluster) -> Iterator[Any]:
    """The real operator, in this process, as the chart's ServiceAccount on a cluster."""
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    memo = kopf.Memo(config=operator_config(), kube=environment.operator_kube())
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(
            run_operator(
                environment.url,
                memo=memo,
                namespaces=[cluster.namespace],
                connection=environment.operator_login(cluster.namespace),
                configure_kubernetes_client=not environment.target.is_cluster,
            )
        )
        yield run
