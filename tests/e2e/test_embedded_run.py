"""The quickstart end to end, with no cluster: `finetune-local demo` and local mode.

One embedded run (API server with the CRDs, the real operator, the local executor running
the trainer Job as a process and the vLLM Deployment as reference servers) is shared by
the tests of this module; local mode then trains the same manifest again and is compared
with what the operator path recorded.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from finetune_local.demo import CLAIM, EXAMPLES, DemoOptions, DemoResult, run_demo
from finetune_local.localrun import run_local
from finetune_operator.domain.adapter_digest import verify_directory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read().decode())


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


class Served:
    """What the test saw from a serving replica while the demo was still running."""

    models: list[str]
    completion: tuple[int, Any]
    unknown: tuple[int, Any]
    base: tuple[int, Any]
    pods: list[dict[str, Any]]
    deployment: dict[str, Any]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, Served, str]:
    served = Served()
    messages = [{"role": "user", "content": "Classify the support ticket. Answer in JSON with "
                 "intent and priority.\nTicket: Where is my package 123?"}]  # fmt: skip

    def probe(endpoint: str, api: Any) -> None:
        served.models = [m["id"] for m in _get(f"{endpoint}/v1/models")["data"]]
        body = {"model": "quickstart", "messages": messages, "max_tokens": 24}
        served.completion = _post(f"{endpoint}/v1/chat/completions", body)
        served.unknown = _post(f"{endpoint}/v1/chat/completions", {**body, "model": "nope"})
        served.base = _post(f"{endpoint}/v1/chat/completions", {**body, "model": "tiny-llama"})
        served.pods = api.read_all("pods", "default", "app=tiny-llama")
        served.deployment = api.read("deployments", "default", "tiny-llama")

    out = io.StringIO()
    workdir = tmp_path_factory.mktemp("demo")
    result = run_demo(DemoOptions(workdir=workdir, out=out, live=False, on_served=probe))
    return result, served, out.getvalue()


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def test_finetunejob_succeeds_with_gates_passed_and_a_verified_digest(demo: Any) -> None:
    result, _served, output = demo
    status = result.finetunejob["status"]
    assert status["phase"] == "Succeeded"
    assert _condition(result.finetunejob, "GatesPassed")["status"] == "True"
    assert all(g["passed"] for g in status["gates"]) and len(status["gates"]) == 2
    adapter_dir = result.workdir / "pvc" / CLAIM / status["adapter"]["uri"].split(f"{CLAIM}/", 1)[1]
    manifest = json.loads((adapter_dir / "manifest.json").read_text())
    assert status["adapter"]["digest"] == manifest["digest"] == verify_directory(adapter_dir)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 60
    assert status["data"]["rowsKept"] > 0
    # What the user sees: live progress lines, the kubectl-style tables and the answer.
    assert "phase=Training step=" in output
    assert "NAME         PHASE" in output or "NAME" in output.split("kubectl get finetune")[1]
    assert status["adapter"]["digest"] in output


def test_adapterdeployment_is_available_and_the_server_serves_the_adapter(demo: Any) -> None:
    result, served, _output = demo
    adep = result.adapterdeployment
    assert _condition(adep, "Available")["status"] == "True"
    assert adep["status"]["current"]["digest"] == result.finetunejob["status"]["adapter"]["digest"]
    assert "quickstart" in served.models and "tiny-llama" in served.models
    code, body = served.completion
    assert code == 200 and body["model"] == "quickstart"
    assert body["choices"][0]["message"]["content"].strip()
    assert served.unknown[0] == 404
    assert served.base[0] == 200
    # The adapter changes the answer: the base model alone says something else.
    assert (
        served.base[1]["choices"][0]["message"]["content"]
        != body["choices"][0]["message"]["content"]
    )
    # The rollout reached every replica through the Deployment (one vLLM server each).
    dep = served.deployment
    assert (
        dep["status"]["updatedReplicas"]
        == dep["status"]["readyReplicas"]
        == dep["spec"]["replicas"]
    )
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any("quickstart=" in a for a in args)
    assert len({p["metadata"]["annotations"]["finetune.dev/endpoint"] for p in served.pods}) == 2
    assert result.answer.strip()


def test_trainer_pod_looked_like_a_cluster_pod(demo: Any) -> None:
    result, _served, _output = demo
    # The quickstart's trainer pod (the schedule cycle's probes and runs have their own).
    pods = (result.workdir / "pods" / "default").iterdir()
    pod_dirs = [d for d in pods if d.name.startswith("quickstart-train-")]
    assert len(pod_dirs) == 1
    # The operator's ConfigMap was mounted with container paths rewritten to local folders.
    config = (pod_dirs[0] / "volumes" / "config" / "job.yaml").read_text()
    assert "/mnt/pvc" not in config and str(result.workdir / "pvc" / CLAIM) in config
    term = json.loads((pod_dirs[0] / "termination" / "trainer").read_text())
    assert term["ok"] is True and term["adapter"]["digest"] == result.digest_on_disk


def test_local_mode_matches_the_operator_path(demo: Any, tmp_path: Path) -> None:
    result, _served, _output = demo
    claim_dir = result.workdir / "pvc" / CLAIM
    out = io.StringIO()
    local = run_local(
        EXAMPLES / "finetunejob.yaml",
        [f"{CLAIM}={claim_dir}"],
        str(tmp_path / "local"),
        out=out,
    )
    assert local.exit_code == 0, out.getvalue()
    assert local.gates_passed and local.summary == "2/2 passed"
    assert "PASS  jsonValidity" in out.getvalue()

    status = result.finetunejob["status"]
    operator_manifest = json.loads(
        (claim_dir / "adapters/quickstart/adapter/manifest.json").read_text()
    )
    local_manifest = json.loads((tmp_path / "local/adapter/manifest.json").read_text())
    # Same data, same resolved settings.
    assert local.result["data"]["digest"] == status["data"]["digest"]
    assert local_manifest["datasetDigest"] == operator_manifest["datasetDigest"]
    assert local_manifest["trainingArguments"] == operator_manifest["trainingArguments"]
    # CPU training with the same seed is bit-identical: same weights, same adapter digest.
    assert (
        local_manifest["files"]["adapter_model.safetensors"]
        == (operator_manifest["files"]["adapter_model.safetensors"])
    )
    assert local.result["adapter"]["digest"] == status["adapter"]["digest"]
    for metric in ("evalLoss", "jsonValidity"):
        assert local.result["metrics"][metric] == pytest.approx(status["metrics"][metric], abs=1e-6)
    assert [g["passed"] for g in local.gates] == [g["passed"] for g in status["gates"]]


def test_a_schedule_cycle_promotes_a_challenger_measured_on_the_same_rows(demo: Any) -> None:
    """The demo's FineTuneSchedule part: new data -> a DataChange run -> it beats the champion
    on the same eval rows (both values from the challenger's run) -> the following
    AdapterDeployment canaries it and serves it."""
    result, _served, output = demo
    cycle = result.cycle
    assert cycle is not None
    assert cycle.source_digest_before and cycle.source_digest_after
    assert cycle.source_digest_before != cycle.source_digest_after
    comparison = cycle.comparison
    assert comparison["decision"] == "Promoted" and comparison["reason"] == "BeatChampion"
    assert comparison["sameEvalRows"] is True and "fallbackReason" not in comparison
    (row,) = comparison["metrics"]
    assert row["metric"] == "evalLoss" and row["challenger"] < row["champion"] - 0.05
    status = cycle.follower["status"]
    assert status["current"]["digest"] != status["previous"]["digest"]
    assert status["canary"]["revision"]["outcome"] == "Promoted"
    # The challenger's own FineTuneJob evaluated the champion's adapter on its rows.
    workdir = result.workdir
    compared = json.loads(
        next(
            (workdir / "pvc" / CLAIM / "adapters").glob(
                f"*/{cycle.challenger_run}/compared_metrics.json"
            )
        ).read_text()
    )
    assert compared["evalLoss"] == pytest.approx(row["champion"])
    for text in (cycle.challenger_run, "sameEvalRows: True", "Promoted", "canary"):
        assert text in output
