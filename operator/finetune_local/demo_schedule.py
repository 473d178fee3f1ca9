"""The schedule part of ``finetune-local demo``: one FineTuneSchedule cycle on new data.

A FineTuneSchedule retrains the quickstart task whenever its training file changes
(``trigger.onDataChange``) and promotes a run only when it beats the champion
(``BeatChampion``) on the same eval rows; an AdapterDeployment follows the schedule's champion
onto its own vLLM Deployment with a canary. The cycle shown: the first run (trained on
tickets without any shipping question) becomes the champion and is served; shipping tickets
arrive in the training file; the probe sees the new fingerprint and starts a run; that run
evaluates itself and the champion on the same fixed eval rows, beats it, and the follower
canaries the new adapter and promotes it.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

SCHEDULE = "quickstart-weekly"
SERVING = "tiny-llama-weekly"
DATA_DIR = "data/weekly"
# The rows of the bundled file kept apart as the fixed eval set (every intent appears there).
EVAL_ROWS = 24
# The intent the first training file lacks, and that the new data brings.
NEW_INTENT = "shipping"
# Small runs: a few dozen CPU steps each (the follower's canary needs seconds, not minutes).
TRAINING = {"maxSteps": 40, "checkpointEverySteps": 40, "loggingEverySteps": 10}
EVALUATION = {"maxNewTokens": 24, "maxSamples": EVAL_ROWS, "latencyRequests": 2}
PROMOTION = {"policy": "BeatChampion", "metrics": [{"metric": "evalLoss", "minMargin": 0.05}]}
CANARY = {
    "type": "Canary",
    "canary": {
        "replicas": 1,
        "analysis": {"intervalSeconds": 1, "checks": 3, "smokeRequests": 2,
                     "maxErrorRate": 0.1, "maxLatencyP95Ms": 20000},
    },
    "progressDeadlineSeconds": 300,
}  # fmt: skip


class CycleFailed(RuntimeError):
    """The schedule cycle did not happen as shown; the message says where."""


@dataclass
class CycleResult:
    champion_run: str
    challenger_run: str
    source_digest_before: str
    source_digest_after: str
    comparison: dict[str, Any]
    follower: dict[str, Any]
    seconds: float


def _intent(row: Mapping[str, Any]) -> str | None:
    try:
        answer = json.loads(str(row.get("completion")))
    except ValueError:
        return None
    return str(answer.get("intent")) if isinstance(answer, dict) else None


def split_rows(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(fixed eval rows, first training file, rows the new data adds): the last EVAL_ROWS
    rows are the eval set; the training rows of NEW_INTENT arrive later."""
    eval_rows, train = lines[-EVAL_ROWS:], lines[:-EVAL_ROWS]
    first = [line for line in train if _intent(json.loads(line)) != NEW_INTENT]
    new = [line for line in train if _intent(json.loads(line)) == NEW_INTENT]
    return eval_rows, first, new


def prepare_data(claim_dir: Path, bundled: Path) -> list[str]:
    """Write the fixed eval file and the first training file; returns the rows to add later."""
    lines = [line for line in bundled.read_text(encoding="utf-8").splitlines() if line.strip()]
    eval_rows, first, new = split_rows(lines)
    folder = claim_dir / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.jsonl").write_text("\n".join(eval_rows) + "\n", encoding="utf-8")
    (folder / "train.jsonl").write_text("\n".join(first) + "\n", encoding="utf-8")
    return new


def schedule_manifest(quickstart: Mapping[str, Any], claim: str, ns: str) -> dict[str, Any]:
    """The schedule: the quickstart FineTuneJob as its template, on the weekly data folder."""
    spec = copy.deepcopy(dict(quickstart["spec"]))
    spec["dataset"] = {
        **{k: v for k, v in spec["dataset"].items() if k != "evalSplit"},
        "train": {"uri": f"pvc://{claim}/{DATA_DIR}/train.jsonl"},
        "eval": {"uri": f"pvc://{claim}/{DATA_DIR}/eval.jsonl"},
    }
    spec["training"] = {**spec["training"], **TRAINING}
    spec["evaluation"] = {**spec.get("evaluation", {}), **EVALUATION}
    spec["output"] = {"uri": f"pvc://{claim}/adapters/{SCHEDULE}"}
    spec["qualityGates"] = [{"metric": "evalLoss", "max": 4.0}]
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {"name": SCHEDULE, "namespace": ns},
        "spec": {
            "schedule": "@weekly",
            "trigger": {
                "onSchedule": False,
                "onDataChange": {"checkIntervalSeconds": 60, "minIntervalSeconds": 60},
            },
            "promotion": PROMOTION,
            "jobTemplate": {"spec": spec},
        },
    }


def serving_manifests(serving_yaml: Path, ns: str) -> list[dict[str, Any]]:
    """The follower's own vLLM Deployment (one replica) and the AdapterDeployment."""
    deployment = next(
        d for d in yaml.safe_load_all(serving_yaml.read_text(encoding="utf-8"))
        if d and d.get("kind") == "Deployment"
    )  # fmt: skip
    deployment = copy.deepcopy(deployment)
    deployment["metadata"] = {"name": SERVING, "namespace": ns, "labels": {"app": SERVING}}
    deployment["spec"]["replicas"] = 1
    deployment["spec"]["selector"] = {"matchLabels": {"app": SERVING}}
    deployment["spec"]["template"]["metadata"] = {"labels": {"app": SERVING}}
    follower = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": SCHEDULE, "namespace": ns},
        "spec": {
            "adapterName": SCHEDULE,
            "source": {"fineTuneScheduleRef": {"name": SCHEDULE}},
            "target": {"deployment": SERVING, "container": "vllm"},
            "strategy": CANARY,
            "rollback": {"automatic": True},
        },
    }
    return [deployment, follower]


def _condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


class _Cycle:
    """Waits on the embedded API and says what happened, step by step."""

    def __init__(self, api: Any, ns: str, out: TextIO, deadline: float,
                 check: Callable[[], None]) -> None:  # fmt: skip
        self.api, self.ns, self.out, self.deadline, self.check = api, ns, out, deadline, check

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def schedule(self) -> dict[str, Any]:
        return dict(
            (self.api.read("finetuneschedules", self.ns, SCHEDULE) or {}).get("status") or {}
        )

    def follower(self) -> dict[str, Any]:
        return dict(self.api.read("adapterdeployments", self.ns, SCHEDULE) or {})

    def wait(self, what: str, probe: Callable[[], Any]) -> Any:
        while True:
            self.check()
            value = probe()
            if value:
                return value
            if time.monotonic() > self.deadline:
                raise CycleFailed(f"timed out waiting for {what}")
            time.sleep(0.5)

    def decided(self, run: str) -> dict[str, Any] | None:
        for record in self.schedule().get("runs") or []:
            if record.get("name") == run and record.get("outcome") == "Failed":
                raise CycleFailed(f"schedule run {run} failed ({record.get('reason')}): "
                                  f"kubectl describe finetunejob {run}")  # fmt: skip
            if record.get("name") == run and record.get("comparison"):
                return dict(record)
        return None

    def served(self, digest: str) -> dict[str, Any] | None:
        obj = self.follower()
        if _condition(obj, "Degraded").get("status") == "True":
            raise CycleFailed(f"AdapterDeployment {SCHEDULE} degraded: "
                              f"{_condition(obj, 'Degraded').get('message')}")  # fmt: skip
        status = obj.get("status") or {}
        current = status.get("current") or {}
        done = status.get("phase") == "Available" and current.get("digest") == digest
        return obj if done else None

    def new_run(self, known: set[str]) -> str | None:
        names = [str(r.get("name")) for r in self.schedule().get("runs") or []]
        fresh = [n for n in names if n not in known]
        return fresh[0] if fresh else None


def run_cycle(
    api: Any,
    claim_dir: Path,
    claim: str,
    examples: Path,
    ns: str,
    out: TextIO,
    deadline: float,
    check: Callable[[], None] = lambda: None,
) -> CycleResult:
    """Apply the schedule and its follower, then play one data change through to serving."""
    started = time.monotonic()
    cycle = _Cycle(api, ns, out, deadline, check)
    new_rows = prepare_data(claim_dir, examples / "train.jsonl")
    quickstart = yaml.safe_load((examples / "finetunejob.yaml").read_text(encoding="utf-8"))
    cycle.say(f"\n==> kubectl apply: FineTuneSchedule {SCHEDULE} (retrain when {DATA_DIR}/"
              "train.jsonl changes, promote a run only if it beats the champion on evalLoss by "
              f"0.05), its vLLM Deployment {SERVING} and AdapterDeployment {SCHEDULE} "
              "(follows the schedule's champion, Canary)")  # fmt: skip
    for doc in [*serving_manifests(examples / "serving.yaml", ns),
                schedule_manifest(quickstart, claim, ns)]:  # fmt: skip
        api.create(doc, keep_status=False)

    first = cycle.wait("the schedule's first run", lambda: cycle.new_run(set()))
    digest_before = str((cycle.schedule().get("dataCheck") or {}).get("sourceDigest") or "")
    cycle.say(f"    data fingerprint {digest_before[:19]}... (no {NEW_INTENT} tickets yet): "
              f"run {first} started")  # fmt: skip
    record = cycle.wait(f"run {first} to finish", lambda: cycle.decided(first))
    comparison = record["comparison"]
    if comparison.get("decision") != "Promoted":
        raise CycleFailed(f"run {first} was not promoted: {comparison.get('message')}")
    champion = cycle.schedule()["champion"]
    loss = (record.get("metrics") or {}).get("evalLoss", float("nan"))
    cycle.say(f"    {first}: evalLoss {loss:.4f} -> "
              f"champion ({comparison['reason']}), {champion['adapter']['digest'][:19]}...")  # fmt: skip
    cycle.wait(f"AdapterDeployment {SCHEDULE} to serve the champion",
               lambda: cycle.served(champion["adapter"]["digest"]))  # fmt: skip
    cycle.say(f"    AdapterDeployment {SCHEDULE} serves it on {SERVING}")

    cycle.say(f"\n==> new data: {len(new_rows)} {NEW_INTENT} tickets appended to {DATA_DIR}/"
              "train.jsonl")  # fmt: skip
    with (claim_dir / DATA_DIR / "train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("\n".join(new_rows) + "\n")
    second = cycle.wait("the data-change run (the probe looks once a minute)",
                        lambda: cycle.new_run({first}))  # fmt: skip
    digest_after = str((cycle.schedule().get("dataCheck") or {}).get("sourceDigest") or "")
    cycle.say(f"    data fingerprint {digest_before[:19]}... -> {digest_after[:19]}...: "
              f"run {second} started (trigger DataChange)")  # fmt: skip
    record = cycle.wait(f"run {second} to finish", lambda: cycle.decided(second))
    comparison = record["comparison"]
    for row in comparison.get("metrics") or []:
        cycle.say(f"    {row['metric']} on the same {EVAL_ROWS} eval rows: challenger {second} "
                  f"{row.get('challenger', float('nan')):.4f}, champion {first} "
                  f"{row.get('champion', float('nan')):.4f} (needs {row['minMargin']} better)")  # fmt: skip
    cycle.say(f"    sameEvalRows: {comparison.get('sameEvalRows')}; decision "
              f"{comparison['decision']} ({comparison['reason']}): {comparison['message']}")  # fmt: skip
    if comparison["decision"] != "Promoted":
        raise CycleFailed(f"run {second} did not beat the champion: {comparison['message']}")
    new_digest = cycle.schedule()["champion"]["adapter"]["digest"]

    cycle.say(f"\n==> AdapterDeployment {SCHEDULE} canaries the new champion")
    follower = cycle.wait("the canary to promote the new champion",
                          lambda: cycle.served(new_digest))  # fmt: skip
    canary = (follower.get("status") or {}).get("canary") or {}
    revision = canary.get("revision") or {}
    cycle.say(f"    canary: {canary.get('checksPassed')} checks passed, "
              f"error rate {canary.get('errorRate')}, p95 latency "
              f"{canary.get('latencyP95Ms')} ms -> {revision.get('outcome')}")  # fmt: skip
    cycle.say(f"    {SERVING} now serves {SCHEDULE} = {second} ({new_digest[:19]}...), "
              f"revision {follower['status']['current'].get('revision')}")  # fmt: skip
    return CycleResult(
        champion_run=first,
        challenger_run=second,
        source_digest_before=digest_before,
        source_digest_after=digest_after,
        comparison=comparison,
        follower=follower,
        seconds=time.monotonic() - started,
    )
