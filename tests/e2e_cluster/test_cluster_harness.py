"""The cluster-only steps of the lifecycle suite, checked here on rendered objects: which
environment is chosen, what is installed from the chart, who the operator runs as, and that
what the harness writes for the kubelet and the Job controller is what Kubernetes accepts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from clusterkit import (
    INSTALL_ORDER,
    Environment,
    Kube,
    Target,
    TargetError,
    finished_job_status,
    install_objects,
    job_finished,
    object_path,
    operator_service_account,
    pod_for_job,
    running_status,
    target_from_env,
    terminated_status,
    token_request,
)
from support.chartlib import NAMESPACE, manifests

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"


def test_embedded_api_unless_the_cluster_run_is_asked_for(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    assert not target_from_env({}).is_cluster
    assert not target_from_env({"KUBECONFIG": str(kubeconfig)}).is_cluster  # not by accident
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    target = target_from_env({"FINETUNE_E2E_CLUSTER": "1", "KUBECONFIG": str(kubeconfig)})
    assert target.is_cluster and target.kubeconfig == str(kubeconfig)


def test_cluster_run_without_kubeconfig_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="needs KUBECONFIG: set KUBECONFIG=/path/to/kubeconfig"):
        target_from_env({"FINETUNE_E2E_CLUSTER": "1"})
    missing = tmp_path / "nope"
    with pytest.raises(TargetError, match=f"KUBECONFIG names {missing}, which is not a file"):
        target_from_env({"FINETUNE_E2E_CLUSTER": "1", "KUBECONFIG": str(missing)})


def test_make_e2e_cluster_without_kubeconfig_fails_with_the_reason() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    # VENV points nowhere: the check must stop make before it would set anything up.
    proc = subprocess.run(
        ["make", "-s", "e2e-cluster", "VENV=/nonexistent-venv"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "make e2e-cluster needs KUBECONFIG" in proc.stderr
    assert "nonexistent-venv" not in proc.stdout + proc.stderr


def test_install_takes_crds_namespace_account_and_rbac_in_order() -> None:
    rendered = manifests()
    objects = install_objects(rendered, NAMESPACE)
    kinds = [o["kind"] for o in objects]
    assert kinds == sorted(kinds, key=INSTALL_ORDER.index)
    assert set(kinds) == {
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    }  # the default values watch every namespace: no Role, no RoleBinding
    assert "Deployment" not in kinds and "Service" not in kinds
    # The CRDs are the repository's generated ones.
    crds = {o["metadata"]["name"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        generated = yaml.safe_load(path.read_text())
        assert crds[generated["metadata"]["name"]]["spec"] == generated["spec"]
    assert {"kind": "Namespace", "name": NAMESPACE} in [
        {"kind": o["kind"], "name": o["metadata"]["name"]} for o in objects
    ]


def test_operator_runs_as_the_account_the_cluster_role_is_bound_to() -> None:
    rendered = manifests()
    namespace, account = operator_service_account(rendered)
    assert namespace == NAMESPACE
    objects = install_objects(rendered, NAMESPACE)
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    assert [(a["metadata"]["namespace"], a["metadata"]["name"]) for a in accounts] == [
        (namespace, account)
    ]
    bindings = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    subjects = [s for b in bindings for s in b["subjects"]]
    assert {"kind": "ServiceAccount", "name": account, "namespace": namespace} in subjects
    # Cluster-wide by default: fresh test namespaces are covered without a Role each.
    bound = {b["roleRef"]["name"] for b in bindings if account in str(b["subjects"])}
    roles = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] in bound]
    assert any("finetunejobs" in r.get("resources", []) for o in roles for r in o["rules"])


def test_token_request_asks_the_token_subresource() -> None:
    body = token_request(600)
    assert body["kind"] == "TokenRequest" and body["spec"] == {"expirationSeconds": 600}
    assert object_path("serviceaccounts", "ns", "fto", "token") == (
        "/api/v1/namespaces/ns/serviceaccounts/fto/token"
    )
    assert (
        object_path("clusterroles", None, "x")
        == "/apis/rbac.authorization.k8s.io/v1/clusterroles/x"
    )
    with pytest.raises(ValueError, match="namespaced"):
        object_path("pods", None)


def test_pod_and_status_writes_are_valid_kubernetes_objects() -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "bot-train-g1", "namespace": "ns", "uid": "u-1"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "trainer"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "trainer", "image": "trainer:1"}],
                },
            }
        },
    }
    pod = pod_for_job(job, "ns")
    assert pod["metadata"]["labels"]["job-name"] == "bot-train-g1"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    started = "2026-01-01T00:00:00Z"
    for status in (
        running_status("trainer", started),
        terminated_status("trainer", 137, "OOMKilled", "", started),
        terminated_status("trainer", 0, None, '{"ok": true}', started),
    ):
        kubernetes_validate.validate({**pod, "status": status}, K8S_VERSION, strict=True)
    assert terminated_status("trainer", 137, "OOMKilled", "", started)["phase"] == "Failed"
    for succeeded in (True, False):
        finished = {**job, "status": finished_job_status(succeeded, started)}
        kubernetes_validate.validate(finished, K8S_VERSION, strict=True)
        assert job_finished(finished) is succeeded
        # The API requires the criteria condition before the terminal one.
        types = [c["type"] for c in finished["status"]["conditions"]]
        assert types == (
            ["SuccessCriteriaMet", "Complete"] if succeeded else ["FailureTarget", "Failed"]
        )
    assert job_finished(job) is None


def test_kubeconfig_client_reaches_the_server_it_names(tmp_path: Path) -> None:
    from finetune_local import Emulator, serve

    api = Emulator()
    with serve(api):
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": str(api.url).rstrip("/")}}],
                    "users": [{"name": "u", "user": {"token": "tester"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        kube = Kube.from_kubeconfig(str(kubeconfig))
        names = {n["metadata"]["name"] for n in kube.list("namespaces", None)}
        assert "default" in names
        assert kube.get("pods", "default", "absent") is None


def test_operator_credentials_are_the_service_account_token() -> None:
    kube = Kube.from_url("https://api.example:6443")
    env = Environment(target=Target(kubeconfig="/k"), kube=kube, installed=[], operator_token="t0k")
    login = env.operator_login("ns-1")
    assert login is not None
    assert (login.server, login.scheme, login.token) == (
        "https://api.example:6443",
        "Bearer",
        "t0k",
    )
    assert login.ca_path is None and login.insecure is False  # the system's CAs
    client = env.operator_kube()
    assert client._auth_headers() == {"authorization": "Bearer t0k"}
    embedded = Environment(target=Target(), kube=Kube.from_url("http://127.0.0.1:1"), installed=[])
    assert embedded.operator_login("ns") is None  # the runner's anonymous login
