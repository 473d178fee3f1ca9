"""The chart's RBAC grants exactly the API calls the operator's code makes, and tenants'
aggregated roles are what platform teams expect."""

from __future__ import annotations

from typing import Any

import pytest
from rbaclib import Derived, derive, granted, permission_of
from support.chartlib import NAMESPACE, RELEASE, by_kind, manifests, one

# Renders the chart and scans every call site of the operator.
pytestmark = pytest.mark.slow

pytest.importorskip("helm_python")

# What kopf needs when it watches every namespace: noticing CRDs installed or upgraded while
# it runs (discovery itself is open to every authenticated client).
KOPF_CLUSTER_WIDE = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
FULLNAME = f"{RELEASE}-finetune-operator"


@pytest.fixture(scope="module")
def derived() -> Derived:
    return derive()


@pytest.fixture(scope="module")
def cluster_objects() -> list[dict[str, Any]]:
    return manifests()


@pytest.fixture(scope="module")
def namespaced_objects() -> list[dict[str, Any]]:
    return manifests({"watchNamespaces": ["team-a", "team-b"]})


def describe(triples: set[tuple[str, str, str]], derived: Derived | None = None) -> str:
    lines = []
    for group, resource, verb in sorted(triples):
        why = ""
        if derived is not None and (group, resource, verb) in derived.permissions:
            why = "  <- " + "; ".join(sorted(derived.permissions[(group, resource, verb)])[:3])
        lines.append(f"  {group or 'core'} {resource} {verb}{why}")
    return "\n".join(lines)


def test_every_call_site_is_understood(derived: Derived) -> None:
    assert not derived.unresolved, (
        "cannot tell which resource these API calls touch; pass the kind as a literal or a "
        "module constant:\n  " + "\n  ".join(derived.unresolved)
    )
    # The scan found the operator's real calls (a scan that finds nothing proves nothing).
    assert ("", "pods/log", "get") in derived.permissions
    assert ("finetune.dev", "finetunejobs/status", "patch") in derived.permissions


def mismatch(rules: list[dict[str, Any]], needed: set[tuple[str, str, str]]) -> tuple[set, set]:
    have = granted(rules)
    return needed - have, have - needed


def test_cluster_role_grants_exactly_what_the_code_calls(
    derived: Derived, cluster_objects: list[dict[str, Any]]
) -> None:
    role = one(cluster_objects, "ClusterRole", FULLNAME)
    missing, extra = mismatch(role["rules"], set(derived.permissions) | KOPF_CLUSTER_WIDE)
    assert not missing, "the ClusterRole misses calls the operator makes:\n" + describe(
        missing, derived
    )
    assert not extra, "the ClusterRole grants what no code needs:\n" + describe(extra)
    binding = one(cluster_objects, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"]["name"] == FULLNAME
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]


def test_namespaced_mode_grants_the_same_per_namespace_and_nothing_cluster_wide(
    derived: Derived, namespaced_objects: list[dict[str, Any]]
) -> None:
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r
        for r in by_kind(namespaced_objects, "Role")
    }
    for namespace in ("team-a", "team-b"):
        role = roles[(namespace, FULLNAME)]
        missing, extra = mismatch(role["rules"], set(derived.permissions))
        assert not missing and not extra, (namespace, describe(missing), describe(extra))
        binding = one(
            [
                b
                for b in by_kind(namespaced_objects, "RoleBinding")
                if b["metadata"]["namespace"] == namespace
            ],
            "RoleBinding",
        )
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    # The price table: one named ConfigMap in the operator's namespace, read-only.
    prices = roles[(NAMESPACE, f"{FULLNAME}-gpu-prices")]
    assert prices["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [f"{FULLNAME}-gpu-prices"],
            "verbs": ["get"],
        }
    ]
    assert not by_kind(namespaced_objects, "ClusterRoleBinding")
    tenant_roles = {f"{FULLNAME}-view", f"{FULLNAME}-edit"}
    assert {
        r["metadata"]["name"] for r in by_kind(namespaced_objects, "ClusterRole")
    } == tenant_roles


def test_price_table_read_is_covered_in_cluster_mode(derived: Derived) -> None:
    """The operator reads its price ConfigMap by name; cluster mode grants configmaps get."""
    assert ("", "configmaps", "get") in derived.permissions


def test_serving_servers_configmaps_are_watched_and_keys_read_with_get_only(
    derived: Derived, namespaced_objects: list[dict[str, Any]]
) -> None:
    """The AdapterDeployment controller reads the ConfigMaps and the key Secret of a vLLM
    container by name, and watches ConfigMaps (a change wakes the AdapterDeployments whose
    server reads it): Secrets are never listed or watched (decision 2060)."""
    for resource in ("configmaps", "secrets"):
        sites = derived.permissions[("", resource, "get")]
        assert any(
            site.startswith("finetune_operator.handlers.adapterdeployment:") for site in sites
        )
    role = next(
        r for r in by_kind(namespaced_objects, "Role")
        if r["metadata"]["namespace"] == "team-a" and r["metadata"]["name"] == FULLNAME
    )  # fmt: skip
    have = granted(role["rules"])
    assert ("", "configmaps", "get") in have and ("", "secrets", "get") in have
    assert ("", "configmaps", "watch") in have
    watched = derived.permissions[("", "configmaps", "watch")]
    assert any(site.startswith("finetune_operator.handlers.adapterdeployment:") for site in watched)
    assert not {("", "secrets", "list"), ("", "secrets", "watch")} & have


def test_mismatch_detects_a_missing_and_an_extra_rule(
    derived: Derived, cluster_objects: list[dict[str, Any]]
) -> None:
    """The comparison really bites: drop one verb, add one, and both are reported."""
    rules = [dict(r) for r in one(cluster_objects, "ClusterRole", FULLNAME)["rules"]]
    rules = [r for r in rules if r["resources"] != ["pods/log"]]
    rules.append({"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]})
    missing, extra = mismatch(rules, set(derived.permissions) | KOPF_CLUSTER_WIDE)
    assert missing == {("", "pods/log", "get")}
    assert extra == {("", "nodes", "get")}


FORBIDDEN_VERBS = {"escalate", "bind", "impersonate", "*"}


@pytest.mark.parametrize(
    "values", [{}, {"watchNamespaces": ["team-a"]}], ids=["cluster", "namespaced"]
)
def test_no_role_is_broader_than_it_must_be(values: dict[str, Any]) -> None:
    objects = manifests(values)
    for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        name = role["metadata"]["name"]
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule, name
            assert "*" not in rule.get("apiGroups", []), name
            assert "*" not in rule.get("resources", []), name
            assert not FORBIDDEN_VERBS & set(rule["verbs"]), name
            if "secrets" in rule.get("resources", []):
                assert set(rule["verbs"]) <= {"get"}, f"{name}: Secrets may only be read by name"


def test_tenant_roles_aggregate_into_view_edit_admin(cluster_objects: list[dict[str, Any]]) -> None:
    view = one(cluster_objects, "ClusterRole", f"{FULLNAME}-view")
    edit = one(cluster_objects, "ClusterRole", f"{FULLNAME}-edit")
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {
        k for k, v in view["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"
    } == {
        aggregate + "view",
        aggregate + "edit",
        aggregate + "admin",
    }
    assert {
        k for k, v in edit["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"
    } == {
        aggregate + "edit",
        aggregate + "admin",
    }
    kinds = {"finetunejobs", "adapterdeployments", "finetuneschedules"}
    assert granted(view["rules"]) == {
        ("finetune.dev", r, v) for r in kinds for v in ("get", "list", "watch")
    }
    assert granted(edit["rules"]) == {
        ("finetune.dev", r, v)
        for r in kinds
        for v in ("create", "update", "patch", "delete", "deletecollection")
    }
    for role in (view, edit):
        assert not any("/" in r for rule in role["rules"] for r in rule["resources"]), (
            "tenants must never write (or need) a status subresource"
        )
    without = manifests({"rbac": {"aggregateToDefaultRoles": False}})
    assert {r["metadata"]["name"] for r in by_kind(without, "ClusterRole")} == {FULLNAME}


def test_rbac_off_renders_no_roles() -> None:
    objects = manifests({"rbac": {"create": False}})
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not by_kind(objects, kind), kind


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/a/pods/p/log", "container=c", ("", "pods/log", "get")),
        ("GET", "/api/v1/namespaces/a/pods", "labelSelector=x%3Dy", ("", "pods", "list")),
        ("GET", "/apis/batch/v1/namespaces/a/jobs", "watch=true", ("batch", "jobs", "watch")),
        (
            "PATCH",
            "/apis/finetune.dev/v1alpha1/namespaces/a/finetunejobs/j/status",
            "",
            ("finetune.dev", "finetunejobs/status", "patch"),
        ),
        ("POST", "/api/v1/namespaces/a/events", "", ("", "events", "create")),
        (
            "DELETE",
            "/apis/apps/v1/namespaces/a/deployments",
            "",
            ("apps", "deployments", "deletecollection"),
        ),
        ("PUT", "/apis/apps/v1/namespaces/a/deployments/d", "", ("apps", "deployments", "update")),
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            "",
            ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ),
    ],
)
def test_paths_map_to_rbac_like_the_api_server(
    method: str, path: str, query: str, expected: tuple[str, str, str]
) -> None:
    assert permission_of(method, path, query) == expected
