"""Run the FineTuneJob lifecycle tests against the embedded API (default) or a real cluster.

``FINETUNE_E2E_CLUSTER=1`` with ``KUBECONFIG`` set (``make e2e-cluster``) points the same tests
at the cluster the kubeconfig names: the CRDs and RBAC rendered from the Helm chart are
applied, the operator runs in the test process with a token of the chart's ServiceAccount
(so RBAC is the chart's, not the tester's), every test gets a fresh namespace that is deleted
afterwards, and the trainer pods the Job controller creates are driven through the
``pods/status`` subresource, since no GPU node runs them. Without the variable the tests run
against the embedded API, through the same HTTP client and the same steps, except what only
a cluster has: its Job controller (the harness creates the Job's pod and finishes the Job
itself), RBAC enforcement and token requests.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import kopf
from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.clients.kube import KubeClient

T = TypeVar("T")
Body = dict[str, Any]

E2E_ENV = "FINETUNE_E2E_CLUSTER"
TEST_NAMESPACE_LABEL = "finetune.dev/e2e"
# The operator's token lives as long as a test session may reasonably take.
TOKEN_SECONDS = 3600

# Kinds the suite installs from the rendered chart, in the order they must exist. The
# operator's Deployment, Service, monitoring objects and checks are left out: the operator
# under test runs in the test process.
INSTALL_ORDER = (
    "CustomResourceDefinition",
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
)

# API path prefix and whether namespaced, by plural.
RESOURCES: dict[str, tuple[str, bool]] = {
    "namespaces": ("/api/v1", False),
    "pods": ("/api/v1", True),
    "configmaps": ("/api/v1", True),
    "secrets": ("/api/v1", True),
    "events": ("/api/v1", True),
    "persistentvolumeclaims": ("/api/v1", True),
    "serviceaccounts": ("/api/v1", True),
    "jobs": ("/apis/batch/v1", True),
    "finetunejobs": (f"/apis/{GROUP}/{VERSION}", True),
    "adapterdeployments": (f"/apis/{GROUP}/{VERSION}", True),
    "customresourcedefinitions": ("/apis/apiextensions.k8s.io/v1", False),
    "clusterroles": ("/apis/rbac.authorization.k8s.io/v1", False),
    "clusterrolebindings": ("/apis/rbac.authorization.k8s.io/v1", False),
    "roles": ("/apis/rbac.authorization.k8s.io/v1", True),
    "rolebindings": ("/apis/rbac.authorization.k8s.io/v1", True),
}
PLURALS = {
    "Namespace": "namespaces",
    "Pod": "pods",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ServiceAccount": "serviceaccounts",
    "Job": "jobs",
    "FineTuneJob": "finetunejobs",
    "AdapterDeployment": "adapterdeployments",
    "CustomResourceDefinition": "customresourcedefinitions",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
    "Role": "roles",
    "RoleBinding": "rolebindings",
}


class TargetError(Exception):
    """The environment asks for a cluster run that cannot work; the message says what to set."""


@dataclass(frozen=True)
class Target:
    """Where the lifecycle tests run: the embedded API, or the cluster of a kubeconfig."""

    kubeconfig: str | None = None

    @property
    def is_cluster(self) -> bool:
        return self.kubeconfig is not None


def target_from_env(env: Mapping[str, str]) -> Target:
    """The embedded API unless ``FINETUNE_E2E_CLUSTER`` is on; then ``KUBECONFIG`` must name
    an existing file (never the kubeconfig in the home folder by accident)."""
    if env.get(E2E_ENV, "").strip().lower() not in ("1", "true", "yes"):
        return Target()
    kubeconfig = env.get("KUBECONFIG", "").strip()
    if not kubeconfig:
        raise TargetError(
            f"{E2E_ENV}=1 runs the FineTuneJob lifecycle tests against a real cluster and "
            "needs KUBECONFIG: set KUBECONFIG=/path/to/kubeconfig for a user who may install "
            f"CRDs and RBAC and create namespaces, or unset {E2E_ENV} to use the embedded API"
        )
    missing = [p for p in kubeconfig.split(os.pathsep) if p and not Path(p).is_file()]
    if missing:
        raise TargetError(f"KUBECONFIG names {', '.join(missing)}, which is not a file")
    return Target(kubeconfig=kubeconfig)


# ------------------------------------------------------------------ the chart's objects


def install_objects(rendered: Iterable[Body], release_namespace: str) -> list[Body]:
    """What a cluster run applies from the rendered chart, in apply order: the CRDs, the
    release namespace, the operator's ServiceAccount and every RBAC object."""
    wanted = [o for o in rendered if o.get("kind") in INSTALL_ORDER]
    namespace: Body = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": release_namespace},
    }
    if not any(o["kind"] == "Namespace" for o in wanted):
        wanted.append(namespace)
    return sorted(wanted, key=lambda o: INSTALL_ORDER.index(o["kind"]))


def operator_service_account(rendered: Iterable[Body]) -> tuple[str, str]:
    """(namespace, name) of the ServiceAccount the chart runs the operator as."""
    deployments = [o for o in rendered if o.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise ValueError(f"expected the chart to render one Deployment, got {len(deployments)}")
    deployment = deployments[0]
    pod_spec = deployment["spec"]["template"]["spec"]
    return deployment["metadata"]["namespace"], pod_spec.get("serviceAccountName", "default")


def token_request(seconds: int = TOKEN_SECONDS) -> Body:
    """A TokenRequest for a ServiceAccount token (``serviceaccounts/<name>/token``)."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": seconds},
    }


def fresh_namespace(prefix: str = "ftj-e2e") -> Body:
    """A fresh namespace for one test, labelled so that leftovers can be found."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": f"{prefix}-{secrets.token_hex(4)}",
            "labels": {TEST_NAMESPACE_LABEL: "true"},
        },
    }


# ------------------------------------------------------------------ HTTP


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def object_path(plural: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
    prefix, namespaced = RESOURCES[plural]
    path = prefix
    if namespaced:
        if namespace is None:
            raise ValueError(f"{plural} are namespaced: name the namespace")
        path += f"/namespaces/{quote(namespace, safe='')}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    return f"{path}/{sub}" if sub else path


class Kube:
    """A small synchronous client for the tests' side of the API (the user and the cluster's
    controllers), on the ``kubernetes`` package's configuration: host, TLS and credentials of
    a kubeconfig, or a plain URL."""

    def __init__(self, configuration: Any) -> None:
        from kubernetes import client

        self.configuration = configuration
        self._api = client.ApiClient(configuration)

    @classmethod
    def from_url(cls, url: str) -> Kube:
        from kubernetes import client

        return cls(client.Configuration(host=url.rstrip("/")))

    @classmethod
    def from_kubeconfig(cls, path: str) -> Kube:
        from kubernetes import client, config

        configuration = client.Configuration()
        # A list of files (KUBECONFIG=a:b) is merged by the loader when given no single file.
        single = path if os.pathsep not in path else None
        config.load_kube_config(config_file=single, client_configuration=configuration)
        return cls(configuration)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Body:
        request = self._api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        http_method, url, headers, payload, _form = request
        response = self._api.call_api(http_method, url, header_params=headers, body=payload)
        data = response.read()
        if response.status >= 400:
            raise ApiError(response.status, (data or b"").decode(errors="replace")[:1000])
        return json.loads(data) if data else {}

    def get(self, plural: str, namespace: str | None, name: str) -> Body | None:
        try:
            return self.call("GET", object_path(plural, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str, namespace: str | None, selector: str = "") -> list[Body]:
        query = {"labelSelector": selector} if selector else None
        items = self.call("GET", object_path(plural, namespace), query=query).get("items")
        return list(items or [])

    def create(self, body: Body) -> Body:
        plural = PLURALS[body["kind"]]
        namespace = body.get("metadata", {}).get("namespace")
        return self.call("POST", object_path(plural, namespace), body)

    def merge_patch(
        self, plural: str, namespace: str | None, name: str, patch: Body, sub: str = ""
    ) -> Body:
        path = object_path(plural, namespace, name, sub)
        return self.call("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, plural: str, namespace: str | None, name: str) -> None:
        try:
            self.call("DELETE", object_path(plural, namespace, name))
        except ApiError as exc:
            if exc.status != 404:
                raise

    def create_or_replace(self, body: Body) -> Body:
        """Create the object, or replace what is there with this content (an install that
        can run again over an earlier one)."""
        try:
            return self.create(body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        meta = body["metadata"]
        plural = PLURALS[body["kind"]]
        current = self.get(plural, meta.get("namespace"), meta["name"]) or {}
        version = current.get("metadata", {}).get("resourceVersion")
        replacement = {**body, "metadata": {**meta, "resourceVersion": version}}
        path = object_path(plural, meta.get("namespace"), meta["name"])
        return self.call("PUT", path, replacement)

    def service_account_token(self, namespace: str, name: str) -> str:
        path = object_path("serviceaccounts", namespace, name, "token")
        answer = self.call("POST", path, token_request())
        return str(answer["status"]["token"])


def wait_until(
    predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        time.sleep(interval)
        value = predicate()
    return value


# ------------------------------------------------------------------ the cluster around the operator


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pod_for_job(job: Body, namespace: str, suffix: str = "a") -> Body:
    """The pod a Job controller makes from the Job's template (for the embedded API, which
    has no Job controller)."""
    template = job["spec"]["template"]
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{suffix}",
            "namespace": namespace,
            "labels": {**template["metadata"].get("labels", {}), "job-name": name},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": name,
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def running_status(container: str, started: str) -> Body:
    """What a kubelet reports for a started pod."""
    return {
        "phase": "Running",
        "startTime": started,
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [
            {
                "name": container,
                "ready": True,
                "restartCount": 0,
                "image": "",
                "imageID": "",
                "state": {"running": {"startedAt": started}},
            }
        ],
    }


def terminated_status(
    container: str, exit_code: int, reason: str | None, message: str, started: str
) -> Body:
    """What a kubelet reports when the pod's only container ended."""
    return {
        "phase": "Succeeded" if exit_code == 0 else "Failed",
        "containerStatuses": [
            {
                "name": container,
                "ready": False,
                "restartCount": 0,
                "image": "",
                "imageID": "",
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                        "message": message,
                        "startedAt": started,
                        "finishedAt": _now(),
                    }
                },
            }
        ],
    }


def finished_job_status(succeeded: bool, started: str) -> Body:
    """The terminal Job status a Job controller writes (both conditions the API requires)."""
    now = _now()
    first, final = ("SuccessCriteriaMet", "Complete") if succeeded else ("FailureTarget", "Failed")
    reason = "" if succeeded else "BackoffLimitExceeded"
    status: Body = {
        "conditions": [
            {"type": first, "status": "True", "lastTransitionTime": now, "reason": reason},
            {"type": final, "status": "True", "lastTransitionTime": now, "reason": reason},
        ],
        "active": 0,
        "startTime": started,
    }
    if succeeded:
        status.update(succeeded=1, completionTime=now)
    else:
        status["failed"] = 1
    return status


def job_finished(job: Body | None) -> bool | None:
    """True (Complete), False (Failed) or None (still going) from a Job's conditions."""
    for cond in (job or {}).get("status", {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return bool(cond["type"] == "Complete")
    return None


class Cluster:
    """The user and the cluster around the operator, in one test namespace.

    ``job_controller``: a real cluster's Job controller makes the trainer pod and finishes the
    Job from the pod's phase; without it (embedded API) this class does both."""

    def __init__(self, kube: Kube, namespace: str, *, job_controller: bool) -> None:
        self.kube = kube
        self.namespace = namespace
        self.job_controller = job_controller
        self._started: dict[str, str] = {}

    # the user's side
    def create(self, body: Body) -> Body:
        body = {**body, "metadata": {**body["metadata"], "namespace": self.namespace}}
        return self.kube.create(body)

    def read(self, plural: str, name: str) -> Body | None:
        return self.kube.get(plural, self.namespace, name)

    def read_all(self, plural: str, selector: str = "") -> list[Body]:
        return self.kube.list(plural, self.namespace, selector)

    def merge_patch(self, plural: str, name: str, patch: Body) -> Body:
        return self.kube.merge_patch(plural, self.namespace, name, patch)

    def delete(self, plural: str, name: str) -> None:
        self.kube.delete(plural, self.namespace, name)

    # the cluster's side
    def trainer_pod(self, job: Body, container: str = "trainer", timeout: float = 30.0) -> str:
        """The Job's pod, started as a kubelet would report it; returns its name."""
        name = job["metadata"]["name"]
        if self.job_controller:
            pods = wait_until(
                lambda: self._new_pods(name),
                timeout=timeout,
                what=(
                    f"the Job controller to create a pod for Job {name} (if none comes, the "
                    "Job's events say why: admission or quota may refuse its pod)"
                ),
            )
            pod = pods[-1]
            if pod["spec"].get("nodeName"):
                raise AssertionError(
                    f"pod {pod['metadata']['name']} was scheduled to node "
                    f"{pod['spec']['nodeName']}: its kubelet owns its status. Run the suite "
                    "against a cluster with no node matching the test jobs' gpuProduct"
                )
        else:
            pod = self.kube.create(pod_for_job(job, self.namespace))
        pod_name: str = pod["metadata"]["name"]
        started = _now()
        self._started[pod_name] = started
        self.kube.merge_patch(
            "pods",
            self.namespace,
            pod_name,
            {"status": running_status(container, started)},
            "status",
        )
        return pod_name

    def _new_pods(self, job_name: str) -> list[Body]:
        """Pods of the Job that this harness has not started yet and that are not going."""
        return [
            p
            for p in self.read_all("pods", f"job-name={job_name}")
            if p["metadata"]["name"] not in self._started
            and not p["metadata"].get("deletionTimestamp")
        ]

    def terminate(
        self,
        pod: str,
        *,
        exit_code: int,
        message: str = "",
        reason: str | None = None,
        container: str = "trainer",
    ) -> None:
        started = self._started.get(pod, _now())
        status = terminated_status(container, exit_code, reason, message, started)
        self.kube.merge_patch("pods", self.namespace, pod, {"status": status}, "status")

    def finish_job(self, name: str, *, succeeded: bool, timeout: float = 30.0) -> None:
        """The Job ends as its pod did: a real Job controller decides, else it is written."""
        if self.job_controller:
            outcome = wait_until(
                lambda: job_finished(self.read("jobs", name)) is not None,
                timeout=timeout,
                what=f"the Job controller to finish Job {name}",
            )
            assert outcome
            assert job_finished(self.read("jobs", name)) is succeeded
            return
        started = min(self._started.values(), default=_now())
        status = finished_job_status(succeeded, started)
        self.kube.merge_patch("jobs", self.namespace, name, {"status": status}, "status")

    def events_about(self, name: str) -> list[Body]:
        return [
            e
            for e in self.read_all("events")
            if (e.get("involvedObject") or {}).get("name") == name
        ]


def install(kube: Kube, objects: Iterable[Body]) -> list[str]:
    """Create or replace each object in order; returns what was installed, as kind/name."""
    done = []
    for body in objects:
        kube.create_or_replace(body)
        done.append(f"{body['kind']}/{body['metadata']['name']}")
    return done


@dataclass
class Environment:
    """The API the suite runs against and the operator's credentials there."""

    target: Target
    kube: Kube  # the tester's (an administrator's) client
    installed: list[str]
    operator_token: str | None = None

    @property
    def url(self) -> str:
        return str(self.kube.configuration.host).rstrip("/")

    @property
    def timeout(self) -> float:
        """How long to wait for the operator: a real API server is further away."""
        return 60.0 if self.target.is_cluster else 20.0

    def operator_kube(self) -> KubeClient:
        if self.operator_token is None:
            return KubeClient.from_url(self.url)
        from kubernetes import client

        admin = self.kube.configuration
        configuration = client.Configuration(host=self.url)
        configuration.ssl_ca_cert = admin.ssl_ca_cert
        configuration.verify_ssl = admin.verify_ssl
        configuration.api_key = {"BearerToken": self.operator_token}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return KubeClient(client.ApiClient(configuration))

    def operator_login(self, namespace: str) -> kopf.ConnectionInfo | None:
        if self.operator_token is None:
            return None  # the embedded API: the runner's own anonymous login
        admin = self.kube.configuration
        return kopf.ConnectionInfo(
            server=self.url,
            ca_path=admin.ssl_ca_cert or None,
            insecure=not admin.verify_ssl,
            scheme="Bearer",
            token=self.operator_token,
            default_namespace=namespace,
        )


def release_finalizers(kube: Kube, namespace: str) -> None:
    """Drop the finalizers of what the test left, so the namespace can go without an operator."""
    for plural in ("finetunejobs", "adapterdeployments"):
        try:
            items = kube.list(plural, namespace)
        except ApiError:
            continue
        for item in items:
            if item["metadata"].get("finalizers"):
                kube.merge_patch(
                    plural, namespace, item["metadata"]["name"], {"metadata": {"finalizers": None}}
                )
