"""Pure AdapterDeployment decisions: source, compatibility, rollout, canary, runtime, history."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from finetune_operator.api.adapterdeployment import (
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    CanaryAnalysis,
)
from finetune_operator.builders import serving as sb
from finetune_operator.planners import adapterdeployment as p

DIGEST = "sha256:" + "1" * 64
OTHER = "sha256:" + "2" * 64
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def spec(**over) -> AdapterDeploymentSpec:
    raw = {
        "adapterName": "support",
        "source": {"fineTuneJobRef": {"name": "ftj"}},
        "target": {"deployment": "llm", "container": "vllm"},
    }
    raw.update(over)
    return AdapterDeploymentSpec.model_validate(raw)


def ftj(
    phase="Succeeded",
    gates="True",
    gates_msg="4/4 passed",
    adapter=True,
    uri="pvc://out/ftj/adapter",
) -> dict:
    status: dict = {"phase": phase, "conditions": []}
    if gates is not None:
        status["conditions"].append({"type": "GatesPassed", "status": gates, "message": gates_msg})
    if adapter:
        status["adapter"] = {
            "uri": uri,
            "digest": DIGEST,
            "rank": 16,
            "baseModel": "hf://org/base",
        }
    return {"spec": {"output": {"credentialsSecretRef": {"name": "creds"}}}, "status": status}


@pytest.mark.parametrize(
    ("job", "require", "ok", "reason", "needle"),
    [
        (ftj(), True, True, "Resolved", "pvc://out/ftj/adapter"),
        (None, True, False, "FineTuneJobNotFound", "source.fineTuneJobRef.name"),
        (ftj(phase="Training"), True, False, "FineTuneJobNotFinished", "is Training"),
        (ftj(phase="Failed"), True, False, "FineTuneJobFailed", "failed"),
        (
            ftj(gates="False", gates_msg="rougeL 0.41 < 0.65 (short by 0.24)"),
            True,
            False,
            "GatesFailed",
            "rougeL 0.41 < 0.65 (short by 0.24)",
        ),
        (ftj(gates="False"), False, True, "Resolved", ""),
        (ftj(gates=None), True, False, "GatesFailed", "no gate verdict"),
        (ftj(adapter=False), True, False, "AdapterMissing", "no adapter"),
        (ftj(uri="ftp://host/a"), True, False, "AdapterMissing", "use pvc://CLAIM/PATH"),
        (ftj(uri="pvc://out/../etc"), True, False, "AdapterMissing", "'..' path segments"),
    ],
)
def test_source_from_finetunejob(job, require, ok, reason, needle) -> None:
    res = p.resolve_source(spec(requireGates=require), job)
    assert (res.ok, res.reason) == (ok, reason)
    assert needle in res.message
    if ok:
        assert res.ref == sb.AdapterRef(
            "support", "pvc://out/ftj/adapter", DIGEST, "hf://org/base", 16, "creds"
        )
    if reason == "GatesFailed":
        assert "requireGates: false" in res.message


def uri_spec(digest=DIGEST) -> AdapterDeploymentSpec:
    return spec(source={"uri": "file:///adapters/a", "digest": digest})


@pytest.mark.parametrize(
    ("local", "ok", "reason"),
    [
        (None, True, "Resolved"),
        (p.LocalManifest(digest=DIGEST, rank=8, base_model="hf://org/base"), True, "Resolved"),
        (p.LocalManifest(digest=OTHER), False, "DigestMismatch"),
        (
            p.LocalManifest(error="adapter_model.safetensors: content differs"),
            False,
            "DigestMismatch",
        ),
        (p.LocalManifest(missing=True, error="manifest.json not found"), False, "AdapterNotFound"),
    ],
)
def test_source_from_uri(local, ok, reason) -> None:
    res = p.resolve_source(uri_spec(), None, local, local_mode=True)
    assert (res.ok, res.reason) == (ok, reason)
    if local is not None and local.rank:
        assert res.ref.rank == 8 and res.ref.base_model == "hf://org/base"
    if reason == "DigestMismatch" and local.digest:
        assert "set source.digest to the adapter's digest" in res.message and OTHER in res.message


def test_file_adapters_are_refused_outside_local_mode_whatever_the_path_holds() -> None:
    """The answer never depends on the operator's own filesystem: no probing through it."""
    answers = {
        (res.ok, res.reason, res.message)
        for local in (None, p.LocalManifest(missing=True, error="x"), p.LocalManifest(digest=OTHER))
        for res in [p.resolve_source(uri_spec(), None, local)]
    }
    assert len(answers) == 1
    ok, reason, message = answers.pop()
    assert (ok, reason) == (False, "LocalAdapterRefused")
    assert "pvc://" in message and "/adapters/a" not in message
    from_job = ftj()
    from_job["status"]["adapter"]["uri"] = "file:///etc"
    res = p.resolve_source(spec(), from_job)
    assert (res.ok, res.reason) == (False, "LocalAdapterRefused")
    assert p.resolve_source(spec(), from_job, local_mode=True).ok


def test_to_revision() -> None:
    status = AdapterDeploymentStatus.model_validate(
        {"history": [{"revision": 1, "uri": "pvc://a/1", "digest": OTHER}]}
    )
    s = spec(rollback={"toRevision": 1})
    src = p.resolve_source(s, ftj())
    res = p.resolve_desired(s, status, src)
    assert res.ok and res.ref.digest == OTHER and res.ref.uri == "pvc://a/1"
    missing = p.resolve_desired(spec(rollback={"toRevision": 5}), status, src)
    assert (missing.ok, missing.reason) == (False, "RevisionNotFound")
    assert "have: 1" in missing.message


RUNTIME_ENV = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]


def target(args: list[str], annotations: dict | None = None) -> dict:
    return {
        "metadata": {"name": "llm", "annotations": annotations or {}},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "command": ["vllm", "serve"],
                            "args": args,
                            "env": RUNTIME_ENV,
                        }
                    ],
                    "volumes": [
                        {"name": "store", "persistentVolumeClaim": {"claimName": "adapters"}}
                    ],
                }
            }
        },
    }


REF = sb.AdapterRef("support", "pvc://adapters/support", DIGEST, "hf://org/base", 16)


@pytest.mark.parametrize(
    ("args", "ref", "allow", "strategy", "ok", "reason", "needle"),
    [
        (["org/base", "--enable-lora"], REF, False, "Rolling", True, "Compatible", ""),
        (["org/base"], REF, False, "Rolling", False, "LoraNotEnabled", "add --enable-lora"),
        (["org/base"], REF, True, "Rolling", True, "Compatible", "--enable-lora"),
        (
            ["org/other", "--enable-lora"],
            REF,
            True,
            "Rolling",
            False,
            "BaseModelMismatch",
            "org/other",
        ),
        (
            ["org/base", "--enable-lora"],
            sb.AdapterRef("support", "pvc://a", DIGEST, None, 64),
            False,
            "Rolling",
            False,
            "RankTooLarge",
            "set --max-lora-rank 64",
        ),
        (
            ["org/base", "--enable-lora", "--max-lora-rank", "32"],
            sb.AdapterRef("support", "pvc://a", DIGEST, None, 48),
            True,
            "Rolling",
            True,
            "Compatible",
            "--max-lora-rank 64",
        ),
        (
            ["org/base", "--enable-lora"],
            sb.AdapterRef("support", "pvc://a", DIGEST, None, 64),
            True,
            "Runtime",
            False,
            "RankTooLarge",
            "Runtime strategy never restarts",
        ),
        (
            ["org/base", "--enable-lora", "--lora-modules", "other=/o"],
            REF,
            False,
            "Rolling",
            False,
            "TooManyAdapters",
            "set --max-loras 2",
        ),
        (
            ["org/base", "--enable-lora", "--lora-modules", "support=/old"],
            REF,
            False,
            "Rolling",
            True,
            "Compatible",
            "",
        ),
    ],
)
def test_compatibility(args, ref, allow, strategy, ok, reason, needle) -> None:
    s = spec(
        target={"deployment": "llm", "container": "vllm", "allowServerArgChanges": allow},
        strategy={"type": strategy},
    )
    res = p.check_compatible(s, "adep", target(args), ref)
    assert (res.ok, res.reason) == (ok, reason), res.message
    assert needle in res.message


def test_compatibility_refusals_without_server() -> None:
    s = spec()
    assert p.check_compatible(s, "adep", None, REF).reason == "TargetNotFound"
    not_vllm = target([])
    not_vllm["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "app.py"]
    res = p.check_compatible(s, "adep", not_vllm, REF)
    assert res.reason == "ServerNotDetected" and "target.container" in res.message
    wrong = p.check_compatible(
        spec(target={"deployment": "llm", "container": "x"}), "adep", target([]), REF
    )
    assert wrong.reason == "ContainerNotFound"
    taken = target(["org/base", "--enable-lora"], {sb.owner_annotation("support"): "someone-else"})
    assert p.check_compatible(s, "adep", taken, REF).reason == "AdapterNameTaken"


@pytest.mark.parametrize(
    ("image", "args", "refused"),
    [
        # vLLM 0.20+: --api-server-count defaults to the data-parallel size.
        ("vllm/vllm-openai:v0.20.0", ["--data-parallel-size", "2"], True),
        ("vllm/vllm-openai:v0.34.0", ["--api-server-count", "3"], True),
        # vLLM 0.11: one API server unless --api-server-count says otherwise.
        ("vllm/vllm-openai:v0.11.0", ["--data-parallel-size", "2"], False),
        ("vllm/vllm-openai:v0.11.0", ["--api-server-count", "2"], True),
        (
            "vllm/vllm-openai:v0.20.0",
            ["--data-parallel-size", "2", "--api-server-count", "1"],
            False,
        ),
    ],
)
def test_runtime_is_refused_where_vllm_runs_several_api_servers(
    image: str, args: list[str], refused: bool
) -> None:
    dep = target(["org/base", "--enable-lora", *args])
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = image
    runtime = p.check_compatible(spec(strategy={"type": "Runtime"}), "adep", dep, REF)
    if refused:
        assert runtime.reason == "RuntimeUpdatesDisabled"
        assert "API-server processes" in runtime.message
        assert "use strategy Rolling" in runtime.message
    else:
        assert runtime.ok, runtime.message
    # Rolling puts the adapter on the command line: the runtime check does not apply.
    assert p.check_compatible(spec(), "adep", dep, REF).ok


def test_runtime_path() -> None:
    dep = target(["m"])
    dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "store", "mountPath": "/mnt/adapters"}
    ]
    assert p.runtime_path(dep, "vllm", REF).message == "/mnt/adapters/support"
    file_ref = sb.AdapterRef("support", "file:///data/a", DIGEST)
    assert p.runtime_path(dep, "vllm", file_ref).message == "/data/a"
    s3 = sb.AdapterRef("support", "s3://bucket/a", DIGEST)
    assert not p.runtime_path(dep, "vllm", s3).ok
    other_claim = sb.AdapterRef("support", "pvc://elsewhere/a", DIGEST)
    res = p.runtime_path(dep, "vllm", other_claim)
    assert not res.ok and "mount PVC elsewhere" in res.message


def dep_status(
    gen=2, observed=2, replicas=2, updated=2, available=2, total=2, digest=DIGEST, conditions=()
) -> dict:
    return {
        "metadata": {"name": "llm", "generation": gen},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"annotations": {sb.digest_annotation("support"): digest}}},
        },
        "status": {
            "observedGeneration": observed,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "readyReplicas": available,
            "replicas": total,
            "conditions": list(conditions),
        },
    }


STARTED = (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("dep", "deadline", "state", "reason"),
    [
        (dep_status(), 600, "Complete", "RolloutComplete"),
        (dep_status(observed=1), 600, "InProgress", "RollingOut"),
        (dep_status(updated=1), 600, "InProgress", "RollingOut"),
        (dep_status(total=3), 600, "InProgress", "RollingOut"),  # an old replica is left
        (dep_status(digest=OTHER), 600, "InProgress", "TemplateNotUpdated"),
        (dep_status(available=1), 10, "Failed", "RolloutDeadlineExceeded"),
        (
            dep_status(
                available=1,
                conditions=[
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "ReplicaSet llm-1 has timed out progressing.",
                    }
                ],
            ),
            600,
            "Failed",
            "ProgressDeadlineExceeded",
        ),
        (None, 600, "Failed", "TargetNotFound"),
    ],
)
def test_deployment_rollout(dep, deadline, state, reason) -> None:
    view = p.deployment_rollout(
        dep, "support", DIGEST, started_at=STARTED, deadline_seconds=deadline, now=NOW
    )
    assert (view.state, view.reason) == (state, reason)


def buckets(*pairs) -> dict[float, float]:
    return {float(le): float(n) for le, n in pairs}


@pytest.mark.parametrize(
    ("bk", "q", "expected"),
    [
        (buckets((0.1, 50), (0.5, 90), (1.0, 100), ("inf", 100)), 0.95, 0.75),
        (buckets((0.1, 100), ("inf", 100)), 0.95, 0.095),
        (buckets((0.1, 0), (1.0, 0), ("inf", 10)), 0.95, 1.0),  # in +Inf: largest finite bound
        (buckets((0.1, 0), ("inf", 0)), 0.95, None),
    ],
)
def test_histogram_quantile(bk, q, expected) -> None:
    got = p.histogram_quantile(q, bk)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_sample_delta_and_restart() -> None:
    a = p.MetricsSample(
        requests=10, errors=1, latency_buckets=buckets((1, 10), ("inf", 10)), latency_count=10
    )
    b = p.MetricsSample(
        requests=30, errors=5, latency_buckets=buckets((1, 25), ("inf", 30)), latency_count=30
    )
    d = p.sample_delta(a, b)
    assert (d.requests, d.errors, d.latency_buckets[1.0], d.latency_count) == (20, 4, 15, 20)
    restarted = p.MetricsSample(requests=3, latency_count=3)
    assert p.sample_delta(b, restarted) is restarted
    total = p.sum_samples([a, b])
    assert total.requests == 40 and total.latency_buckets[float("inf")] == 40


FAST = buckets((0.05, 10), (0.1, 10), ("inf", 10))
SLOW = buckets((0.05, 0), (2.5, 0), (5.0, 10), ("inf", 10))


@pytest.mark.parametrize(
    ("window", "smoke", "passed", "action", "reason"),
    [
        (
            p.MetricsSample(requests=10, latency_buckets=FAST, latency_count=10),
            [],
            0,
            "continue",
            "Analyzing",
        ),
        (
            p.MetricsSample(requests=10, latency_buckets=FAST, latency_count=10),
            [],
            2,
            "promote",
            "CanaryPassed",
        ),
        (
            p.MetricsSample(requests=10, errors=3, latency_buckets=FAST, latency_count=10),
            [],
            2,
            "abort",
            "CanaryErrorRate",
        ),
        (
            p.MetricsSample(requests=10, latency_buckets=SLOW, latency_count=10),
            [],
            0,
            "abort",
            "CanaryLatency",
        ),
        (
            p.MetricsSample(requests=2, errors=2),
            [],
            0,
            "continue",
            "WaitingForTraffic",
        ),  # under minRequests
        (p.MetricsSample(), [], 0, "continue", "WaitingForTraffic"),
        (
            p.MetricsSample(requests=10, latency_buckets=FAST, latency_count=10),
            [
                p.SmokeResult(True, 5.0),
                p.SmokeResult(False, 5.0, "HTTP 404: model support not found"),
            ],
            0,
            "abort",
            "CanarySmokeFailed",
        ),
    ],
)
def test_decide_canary(window, smoke, passed, action, reason) -> None:
    analysis = CanaryAnalysis(checks=3, maxErrorRate=0.1, maxLatencyP95Ms=1000, minRequests=5)
    d = p.decide_canary(analysis, window, smoke, passed)
    assert (d.action, d.reason) == (action, reason), d.message
    if reason == "CanaryErrorRate":
        assert "30.0%" in d.message and d.error_rate == pytest.approx(0.3)
    if reason == "CanaryLatency":
        assert d.latency_p95_ms == pytest.approx(4875.0)  # 2.5 s + 0.95 x (5 - 2.5) s
    if reason == "CanarySmokeFailed":
        assert "model support not found" in d.message


def pod(name, ready=True, loaded=None, endpoint="http://127.0.0.1:1") -> p.PodView:
    return p.PodView(name, ready, endpoint, loaded)


def test_plan_runtime() -> None:
    pods = [
        pod("a", loaded={"support": "/p"}),  # serving the desired digest already
        pod("b", loaded={}),  # restarted: lost the adapter
        pod("c", loaded={"support": "/p"}),  # has the old digest
        pod("d", ready=False, loaded={}),  # not ready: left alone
    ]
    plan = p.plan_runtime(pods, "support", DIGEST, {"a": DIGEST, "b": DIGEST, "c": OTHER}, "/p")
    assert plan.actions == [p.PodAction("b", "load"), p.PodAction("c", "reload")]
    assert plan.serving == {"a": DIGEST, "b": DIGEST, "c": DIGEST}
    assert not plan.done and plan.ready_pods == 3
    settled = p.plan_runtime(pods[:1], "support", DIGEST, {"a": DIGEST}, "/p")
    assert settled.done and not settled.actions
    unload = p.plan_runtime(pods[:2], "support", None, {"a": DIGEST}, None)
    assert unload.actions == [p.PodAction("a", "unload")]
    unreachable = p.plan_runtime([pod("a", loaded=None)], "support", DIGEST, {"a": DIGEST}, "/p")
    assert not unreachable.done and not unreachable.actions


def test_plan_runtime_believes_the_listed_path_over_the_record() -> None:
    """The record says what a call would leave; a pod listing the adapter from another path
    than the revision's did not take it (the call failed without a final answer)."""
    pods = [pod("a", loaded={"support": "/old"}), pod("b", loaded={"support": "/new"})]
    plan = p.plan_runtime(pods, "support", DIGEST, {"a": DIGEST, "b": DIGEST}, "/new")
    assert plan.actions == [p.PodAction("a", "reload")] and not plan.done
    # The same path cannot tell versions apart: the record decides.
    same = p.plan_runtime(pods[1:], "support", DIGEST, {"b": OTHER}, "/new")
    assert same.actions == [p.PodAction("b", "reload")]
    # A server that names no path for it cannot contradict the record.
    unnamed = p.plan_runtime(
        [pod("c", loaded={"support": ""})], "support", DIGEST, {"c": DIGEST}, "/new"
    )
    assert unnamed.done and not unnamed.actions


def test_revisions_are_monotonic_and_bounded() -> None:
    status = AdapterDeploymentStatus()
    ref = sb.AdapterRef("support", "pvc://a", DIGEST)
    history: list = []
    for _ in range(25):
        rev = p.new_revision(status, ref, "t")
        history = p.record_history(history, rev)
        status = AdapterDeploymentStatus(history=history, current=rev)
    assert [r.revision for r in history] == list(range(6, 26))
    assert p.next_revision(status) == 26


def test_already_rejected_until_spec_changes() -> None:
    ref = sb.AdapterRef("support", "pvc://a", DIGEST)
    status = AdapterDeploymentStatus.model_validate(
        {
            "observedGeneration": 3,
            "history": [
                {"revision": 1, "uri": "pvc://a", "digest": DIGEST, "outcome": "RolledBack"}
            ],
        }
    )
    rejected = p.already_rejected(status, ref, 3)
    assert rejected is not None and rejected.revision == 1
    assert p.already_rejected(status, ref, 4) is None


def test_server_errors_in_smoke_are_judged_by_the_error_rate() -> None:
    analysis = CanaryAnalysis(checks=3, maxErrorRate=0.5)
    window = p.MetricsSample(requests=4, errors=1)
    smoke = [p.SmokeResult(False, 3.0, "HTTP 500: boom", 500), p.SmokeResult(True, 3.0, status=200)]
    d = p.decide_canary(analysis, window, smoke, 0)
    assert (d.action, d.reason) == ("continue", "Analyzing")
    assert d.error_rate == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("container", "allowed"),
    [
        ({"env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}]}, True),
        ({"env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "0"}]}, False),
        ({}, False),
        ({"envFrom": [{"configMapRef": {"name": "vllm-env"}}]}, None),
        (
            {
                "env": [
                    {
                        "name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
                        "valueFrom": {"configMapKeyRef": {}},
                    }
                ]
            },
            None,
        ),
    ],
)
def test_runtime_updates_allowed(container, allowed) -> None:
    assert p.runtime_updates_allowed(container) is allowed


def test_generation_speed_over_a_window_and_a_restart() -> None:
    before = p.MetricsSample(generation_tokens=100, generation_requests=10, decode_seconds=4.5)
    now = p.MetricsSample(generation_tokens=150, generation_requests=15, decode_seconds=6.5)
    window = p.sample_delta(before, now)
    # 50 tokens in 5 requests, 45 of them decoded in 2 s.
    assert window.decode_tokens == 45 and window.tokens_per_second_per_request == 22.5
    restarted = p.MetricsSample(generation_tokens=12, generation_requests=2, decode_seconds=1.0)
    assert p.sample_delta(now, restarted) == restarted  # the counters went down: a new server
    # The smoke requests' generation, seen only by the server, joins the window.
    smoke = p.MetricsSample(generation_tokens=32, generation_requests=2, decode_seconds=3.0)
    joined = p.with_generation_of(window, smoke)
    assert (joined.decode_tokens, joined.decode_seconds) == (75, 5.0)
    assert (
        p.MetricsSample(generation_tokens=3, generation_requests=1).tokens_per_second_per_request
        == math.inf
    )


@pytest.mark.parametrize(
    ("decoded", "action", "reason"),
    [(80.0, "continue", "Analyzing"), (40.0, "abort", "CanarySlowGeneration")],
)
def test_decide_canary_judges_generation_speed(decoded: float, action: str, reason: str) -> None:
    analysis = CanaryAnalysis(checks=3, minTokensPerSecondPerRequest=50)
    window = p.MetricsSample(
        requests=10, generation_tokens=decoded + 10, generation_requests=10, decode_seconds=1.0
    )
    d = p.decide_canary(analysis, window, [], 0)
    assert (d.action, d.reason, d.tokens_per_second) == (action, reason, decoded)
    if action == "abort":
        assert (
            "40.0 tokens/s per request (40 tokens decoded in 1.0 s over 10 requests)" in d.message
        )
