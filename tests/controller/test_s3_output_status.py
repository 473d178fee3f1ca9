"""An s3:// output as the operator sees it: the uploaded adapter's URI and digest land in
status, an AdapterDeployment sources them with the output's Secret and fetches with a
digest check, and a failed upload ends in an ``UploadFailed`` condition with advice."""

from __future__ import annotations

import json
from typing import Any

from finetune_operator.api.adapterdeployment import AdapterDeploymentSpec
from finetune_operator.api.finetunejob import status_wire
from finetune_operator.builders import serving as sb
from finetune_operator.planners import adapterdeployment as ad
from support.ftj_planning import cond, started, track, with_conditions
from support.ftj_samples import pod, result, spec

OUTPUT = {"uri": "s3://corp-out/runs/bot", "credentialsSecretRef": {"name": "s3-out"}}
DIGEST = "sha256:" + "b" * 64


def _s3_spec() -> dict[str, Any]:
    return spec(output=OUTPUT)


def test_uploaded_adapter_is_recorded_and_served_from_s3_with_its_digest() -> None:
    body = _s3_spec()
    first, job, cm = started(body)
    # What the trainer reports after the upload verified (finetune_trainer.cli).
    done = result()
    done["adapter"] = {**done["adapter"], "uri": "s3://corp-out/runs/bot/adapter", "digest": DIGEST}
    terminated = {"terminated": {"exitCode": 0, "message": json.dumps(done)}}
    p = track(
        first,
        with_conditions(job, "Complete"),
        cm,
        body,
        pods=(pod("p", phase="Succeeded", trainer_state=terminated),),
    )
    assert p.status.adapter.uri == "s3://corp-out/runs/bot/adapter"
    assert p.status.adapter.digest == DIGEST
    assert cond(p, "Succeeded").status == "True"

    # An AdapterDeployment pointing at that FineTuneJob.
    ftj = {"spec": body, "status": status_wire(p.status)}
    adep = AdapterDeploymentSpec.model_validate(
        {
            "adapterName": "support",
            "source": {"fineTuneJobRef": {"name": "bot"}},
            "target": {"deployment": "llm", "container": "vllm"},
        }
    )
    source = ad.resolve_source(adep, ftj)
    assert source.ok and source.ref is not None
    assert (source.ref.uri, source.ref.digest) == ("s3://corp-out/runs/bot/adapter", DIGEST)
    init = sb.placement(source.ref, "trainer:1").init_container
    assert init is not None
    assert init["args"] == [
        *("--uri", "s3://corp-out/runs/bot/adapter"),
        *("--dest", f"{sb.FETCH_ROOT}/adapter", "--digest", DIGEST),
    ]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-out"}}]


def test_failed_upload_is_a_failed_condition_with_advice_and_a_warning() -> None:
    body = _s3_spec()
    first, job, cm = started(body)
    failure = result(
        ok=False,
        reason="UploadFailed",
        message="upload to s3://corp-out/runs/bot failed: bucket corp-out does not exist",
    )
    terminated = {"terminated": {"exitCode": 2, "reason": "Error", "message": json.dumps(failure)}}
    p = track(
        first,
        with_conditions(job, "FailureTarget", "Failed", reason="PodFailurePolicy"),
        cm,
        body,
        pods=(pod("p", phase="Failed", trainer_state=terminated),),
    )
    failed = cond(p, "Failed")
    assert (failed.status, failed.reason) == ("True", "UploadFailed")
    assert "bucket corp-out does not exist" in failed.message
    assert "spec.output.credentialsSecretRef" in failed.message
    assert p.status.adapter is None
    assert p.status.phase == "Failed"
    assert any(e.type == "Warning" and e.reason == "UploadFailed" for e in p.events)
