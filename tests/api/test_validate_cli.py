"""`python -m finetune_operator.tools.validate` gives the API server's verdict, offline.

Exit 0 exactly for what the server accepts: the CRDs' structural schema with JSON types as
they are (no coercion), the CEL rules, metadata rules, strict field validation, and with
`--old` the transition rules of an update.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from api.parity_cases import (
    BAD_NAMES,
    CHILD_FIELDS,
    GOOD_NAMES,
    QUOTED_SCALARS,
    UNKNOWN_FIELDS,
    body,
    huge_affinity,
    largest_affinity,
    manifest,
)
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.builders import (
    owner_reference,
    resolve_trainer_config,
    trainer_configmap,
    trainer_job,
)
from finetune_operator.config import OperatorConfig
from finetune_operator.tools import validate as cli
from support.crdcheck import CRD_DIR, ROOT, load_crd, openapi_schema, validate

INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().out


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- types as they are


@pytest.mark.parametrize(("what", "bad", "field", "good"), QUOTED_SCALARS, ids=lambda v: str(v))
def test_quoted_numbers_and_booleans_are_refused_and_unquoted_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, bad: str, field: str, good: str
) -> None:
    code, out = run(capsys, write(tmp_path, manifest(bad)))
    assert code == 1, out
    assert f"{field}: Invalid value" in out
    assert "without quotes" in out, out
    code, out = run(capsys, write(tmp_path, manifest(good)))
    assert (code, out.strip().endswith("FineTuneJob/bot: valid")) == (0, True), out


def test_auto_batch_size_is_the_only_word_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, write(tmp_path, manifest("training: {batchSize: auto}")))[0] == 0
    code, out = run(capsys, write(tmp_path, manifest("training: {batchSize: max}")))
    assert code == 1 and "spec.training.batchSize" in out


@pytest.mark.parametrize(
    ("spec_yaml", "valid"),
    [
        ("training: {learningRate: 2e-4}", True),  # a number for kubectl, a string for PyYAML
        ("lora: {r: 1e1}", True),  # 10: kubectl sends it as an integer
        ("lora: {r: 16.0}", True),
        ("lora: {r: 16.5}", False),
        ("training: {seed: 1:30}", False),  # a string for kubectl, 90 for PyYAML
        ("suspend: yes", True),
        ("suspend: y", True),  # YAML 1.1 boolean, as kubectl reads it
        ("suspend: 'y'", False),
        ("training: {learningRate: .nan}", False),  # not representable in JSON
        ("resources: {nodeSelector: {yes: a, 1: b}}", True),  # keys "true" and "1"
        ("resources: {nodeSelector: {pool: yes}}", False),  # the value is a boolean
    ],
)
def test_plain_yaml_scalars_are_typed_as_kubectl_types_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec_yaml: str, valid: bool
) -> None:
    code, out = run(capsys, write(tmp_path, manifest(spec_yaml)))
    assert code == (0 if valid else 1), out


def test_unknown_fields_are_refused_as_with_kubectl_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(capsys, write(tmp_path, manifest("trainig: {epochs: 2}")))
    assert code == 1 and 'unknown field "spec.trainig"' in out
    code, out = run(capsys, write(tmp_path, manifest().replace("name: bot", "name: bot\n  nme: x")))
    assert code == 1 and "metadata.nme" in out


def test_status_in_a_manifest_is_ignored_as_the_status_subresource_ignores_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = manifest() + "status:\n  phase: 7\n"
    code, out = run(capsys, write(tmp_path, text))
    assert code == 0, out
    # strict field validation still sees the object as sent
    code, out = run(capsys, write(tmp_path, manifest() + "status:\n  bogus: true\n"))
    assert code == 1 and 'unknown field "status.bogus"' in out


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize(("what", "name"), BAD_NAMES, ids=[w for w, _ in BAD_NAMES])
def test_names_that_are_not_dns_subdomains_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, name: str
) -> None:
    code, out = run(capsys, write(tmp_path, manifest(name=json.dumps(name))))
    assert code == 1, out
    assert "metadata.name: Invalid value" in out


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_dns_subdomain_names_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert run(capsys, write(tmp_path, manifest(name=name)))[0] == 0


@pytest.mark.parametrize(
    ("metadata_yaml", "complaint"),
    [
        ("namespace: Team_A", "metadata.namespace"),
        ("namespace: " + "n" * 64, "metadata.namespace"),
        ('labels: {"team name": a}', "metadata.labels"),
        ("labels: {team: " + "v" * 64 + "}", "metadata.labels"),
        ("labels: {replicas: 3}", "metadata.labels[replicas]"),
        ("annotations: {retries: 5}", "metadata.annotations[retries]"),
        ('annotations: {"a/b/c": x}', "metadata.annotations"),
        ("annotations: {big: " + "x" * 262_144 + "}", "metadata.annotations: Too long"),
        ("finalizers: [not a name]", "metadata.finalizers[0]"),
    ],
)
def test_metadata_follows_the_api_servers_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metadata_yaml: str, complaint: str
) -> None:
    text = manifest().replace("  name: bot\n", f"  name: bot\n  {metadata_yaml}\n")
    code, out = run(capsys, write(tmp_path, text))
    assert code == 1 and complaint in out, out


def test_namespace_labels_and_annotations_that_follow_the_rules_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = (
        "  name: bot\n  namespace: team-a\n"
        "  labels: {app.kubernetes.io/name: bot, empty: ''}\n"
        "  annotations: {Example.com/Note: 'any text: even spaces'}\n"
    )
    text = manifest().replace("  name: bot\n", meta)
    assert run(capsys, write(tmp_path, text))[0] == 0


def test_generate_name_alone_is_refused_as_kubectl_apply_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(
        capsys, write(tmp_path, manifest().replace("  name: bot", "  generateName: bot-"))
    )
    assert code == 1 and "kubectl apply needs a name" in out


# ---------------------------------------------------------------- fields copied into the Job


@pytest.mark.parametrize(
    ("what", "bad", "field", "good"),
    CHILD_FIELDS + UNKNOWN_FIELDS,
    ids=[c[0] for c in CHILD_FIELDS + UNKNOWN_FIELDS],
)
def test_fields_copied_into_the_trainer_pod_follow_kubernetes_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, bad: str, field: str, good: str
) -> None:
    code, out = run(capsys, write(tmp_path, manifest(bad)))
    assert code == 1, out
    assert field in out, out
    code, out = run(capsys, write(tmp_path, manifest(good)))
    assert code == 0, out
    # what the CRD accepts, the operator's model accepts and turns into a valid Job
    FineTuneJobSpec.model_validate(body(good)["spec"])


def test_a_megabyte_affinity_is_refused_in_a_short_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = body()
    doc["spec"]["resources"] = {"affinity": huge_affinity()}
    text = json.dumps(doc)  # JSON is YAML too
    assert len(text) > 1_000_000
    code, out = run(capsys, write(tmp_path, text))
    assert code == 1
    assert "nodeSelectorTerms: Too many" in out
    assert len(out) < 5_000, "the tenant's megabyte must not be echoed back"


def test_the_largest_accepted_affinity_keeps_the_job_and_configmap_far_below_api_limits() -> None:
    doc = body()
    doc["spec"]["resources"] = {"gpus": 1, "affinity": largest_affinity()}
    assert validate(doc) == []
    spec = FineTuneJobSpec.model_validate(doc["spec"])
    config = OperatorConfig(trainer_image="registry.example/trainer:1.0")
    owner = owner_reference("FineTuneJob", "bot", "uid-1")
    job = trainer_job("bot", "team-a", 1, spec, owner, config, "hash")
    trainer_config = resolve_trainer_config(
        "bot", "team-a", 1, spec, batch_size=4, gradient_checkpointing=True, config=config
    )
    configmap = trainer_configmap("bot", "team-a", 1, trainer_config, owner, "hash")
    assert job["spec"]["template"]["spec"]["affinity"] == largest_affinity()
    job_bytes = len(json.dumps(job))
    configmap_bytes = sum(len(v.encode()) for v in configmap["data"].values())
    # API limits: 1 MiB of ConfigMap data, 1.5 MiB per object in etcd
    assert configmap_bytes < 512 * 1024, configmap_bytes
    assert job_bytes < 512 * 1024, job_bytes


# ---------------------------------------------------------------- updates


def started(spec_yaml: str = "") -> str:
    return manifest(spec_yaml) + "status:\n  phase: Training\n  startedAt: '2026-12-01T10:00:00Z'\n"


def test_a_frozen_field_changed_after_start_is_refused_only_with_old(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = write(tmp_path, started("lora: {r: 16}"), "live.yaml")
    new = write(tmp_path, manifest("lora: {r: 32}"))
    assert run(capsys, new)[0] == 0, "as a create, the new manifest is fine"
    code, out = run(capsys, "--old", old, new)
    assert code == 1
    assert "FineTuneJob/bot (update): INVALID" in out
    assert "spec is frozen once training has started" in out


def test_mutable_fields_may_change_after_start_and_anything_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = write(tmp_path, started("suspend: false"), "live.yaml")
    code, out = run(capsys, "--old", live, write(tmp_path, manifest("suspend: true")))
    assert code == 0 and "(update): valid" in out
    pending = write(tmp_path, manifest("lora: {r: 16}"), "pending.yaml")
    assert run(capsys, "--old", pending, write(tmp_path, manifest("lora: {r: 32}")))[0] == 0


def test_old_objects_are_matched_by_kind_and_name_in_a_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [yaml.safe_load(started("lora: {r: 16}")), body("lora: {r: 8}", name="other")]
    live = write(tmp_path, yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    new = manifest("lora: {r: 32}") + "---\n" + manifest("lora: {r: 4}", name="other")
    code, out = run(capsys, "--old", live, write(tmp_path, new, "new.yaml"))
    assert code == 1
    assert "FineTuneJob/bot (update): INVALID" in out
    assert "FineTuneJob/other (update): valid" in out


def test_renaming_through_old_is_another_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = write(tmp_path, started(), "live.yaml")
    code, out = run(capsys, "--old", live, write(tmp_path, manifest(name="bot2")))
    assert code == 0 and "FineTuneJob/bot2: valid" in out  # a create, not an update


# ---------------------------------------------------------------- the repository's manifests


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, str(path))
    assert code == 0, out


def _expected(path: Path) -> str:
    line = next(x for x in path.read_text().splitlines() if x.startswith("# expect:"))
    return line.split(":", 1)[1].strip()


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_every_invalid_manifest_is_refused_naming_the_field(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = path.read_text().split("\n---\n")
    if len(docs) == 2:  # a stored object, then the update
        code, out = run(
            capsys, "--old", write(tmp_path, docs[0], "live.yaml"), write(tmp_path, docs[1])
        )
    else:
        code, out = run(capsys, str(path))
    assert code == 1, out
    assert "INVALID" in out and _expected(path) in out, out


def test_other_kinds_are_skipped_and_unknown_versions_of_ours_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n" + manifest()
    code, out = run(capsys, write(tmp_path, text))
    assert code == 0 and "ConfigMap" not in out
    code, out = run(capsys, write(tmp_path, manifest().replace("v1alpha1", "v1")))
    assert code == 1 and 'no matches for kind "FineTuneJob" in version "finetune.dev/v1"' in out


def test_crds_from_a_folder_give_the_same_verdicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path, manifest('lora: {r: "16"}'))
    assert run(capsys, "--crds", str(CRD_DIR), bad)[0] == 1
    assert run(capsys, "--crds", str(CRD_DIR), write(tmp_path, manifest(), "ok.yaml"))[0] == 0


def test_unreadable_input_exits_2_and_broken_yaml_is_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--old", str(tmp_path / "missing.yaml"), write(tmp_path, manifest()))[0] == 2
    code, out = run(capsys, write(tmp_path, "spec: [unclosed\n"))
    assert code == 1 and "cannot read it" in out


def test_runs_as_a_module_with_the_exit_status_of_the_verdict(tmp_path: Path) -> None:
    bad = write(tmp_path, manifest('backoffLimit: "3"'))
    done = subprocess.run(
        [sys.executable, "-m", "finetune_operator.tools.validate", bad],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "spec.backoffLimit" in done.stdout


# ---------------------------------------------------------------- kubectl explain


def test_batch_size_is_published_as_int_or_string_with_bounds_and_pattern() -> None:
    node: dict[str, Any] = openapi_schema(load_crd("FineTuneJob"))["properties"]["spec"][
        "properties"
    ]["training"]["properties"]["batchSize"]
    assert node["x-kubernetes-int-or-string"] is True
    assert "type" not in node and "x-kubernetes-validations" not in node
    assert (node["minimum"], node["maximum"], node["pattern"]) == (1, 4096, "^auto$")
    assert "integer" in node["description"] and "auto" in node["description"]


# ---------------------------------------------------------------- the rules themselves


def _rules(node: dict[str, Any]) -> list[str]:
    found = [r["rule"] for r in node.get("x-kubernetes-validations", [])]
    for sub in (node.get("properties") or {}).values():
        found += _rules(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _rules(node[key])
    return found


# Standard CEL only: no Kubernetes extension library, which offline evaluators do not have.
STANDARD_CEL = {
    "_&&_", "_||_", "!_", "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_", "_?_:_", "@in",
    "@not_strictly_false", "_[_]", "matches", "size", "type", "has", "all", "exists",
}  # fmt: skip


@pytest.mark.parametrize("kind", ["FineTuneJob", "AdapterDeployment"])
def test_every_cel_rule_compiles_and_uses_standard_cel_only(kind: str) -> None:
    import cel

    rules = _rules(openapi_schema(load_crd(kind)))
    assert rules
    for rule in rules:
        used = set(cel.compile(rule).functions())
        assert used <= STANDARD_CEL, (rule, used - STANDARD_CEL)


def test_a_missing_cel_package_is_named_with_the_install_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_operator.tools import crdvalidation

    def missing() -> None:
        raise crdvalidation.MissingDependency(crdvalidation.INSTALL_HINT)

    crdvalidation._program.cache_clear()
    monkeypatch.setattr(crdvalidation, "_import_cel", missing)
    try:
        assert cli.main([write(tmp_path, manifest())]) == 2
    finally:
        crdvalidation._program.cache_clear()
    err = capsys.readouterr().err
    assert "the validate extra" in err and "pip install '.[validate]'" in err


# The API server's static limits on CEL (apiextensions validation): per rule, its estimated
# cost times the most places it can run; and for all rules of a CRD together.
PER_RULE_LIMIT = 10_000_000
PER_CRD_LIMIT = 100_000_000
MATCHES = re.compile(r"([A-Za-z_][\w.]*(?:\[\d+\])?)\.matches\('([^']*)'\)")


def _matches_cost(rule: str, node: dict[str, Any]) -> int:
    """cel-go's estimate for the `matches` calls of a rule: ceil(0.1 * string size) *
    ceil(0.25 * regex size), once per map key for `self.all(k, ...)`."""
    total = 0
    for target, regex in MATCHES.findall(rule):
        runs = 1
        if target == "self":
            size = node["maxLength"]
        elif target == "k":  # a key of a label map: a qualified name
            size, runs = 317, node["maxProperties"]
        else:  # self.<list>[0]
            field = target.split(".")[1].split("[")[0]
            size = node["properties"][field]["items"]["maxLength"]
        total += runs * math.ceil(0.1 * size) * math.ceil(0.25 * len(regex))
    return total


def _rule_costs(node: dict[str, Any], cardinality: int = 1) -> list[tuple[str, int]]:
    costs = [
        (r["rule"], cardinality * (_matches_cost(r["rule"], node) + 100))
        for r in node.get("x-kubernetes-validations", [])
    ]
    for sub in (node.get("properties") or {}).values():
        costs += _rule_costs(sub, cardinality)
    if isinstance(node.get("items"), dict):
        costs += _rule_costs(node["items"], cardinality * node["maxItems"])
    if isinstance(node.get("additionalProperties"), dict):
        costs += _rule_costs(node["additionalProperties"], cardinality * node["maxProperties"])
    return costs


@pytest.mark.parametrize("kind", ["FineTuneJob", "AdapterDeployment"])
def test_cel_rules_stay_far_inside_the_api_servers_cost_limits(kind: str) -> None:
    costs = _rule_costs(openapi_schema(load_crd(kind))["properties"]["spec"])
    worst_rule, worst = max(costs, key=lambda c: c[1])
    assert worst < PER_RULE_LIMIT / 10, worst_rule
    assert sum(cost for _, cost in costs) < PER_CRD_LIMIT / 10


@pytest.mark.parametrize(
    "good", [c[3] for c in CHILD_FIELDS if "affinity" in c[3]], ids=lambda g: g[:60]
)
def test_an_affinity_reaches_the_pod_as_written(good: str) -> None:
    """The operator's model gives back exactly what was applied: the Pod gets the user's
    affinity, and a stored job's spec hash does not change when the operator is upgraded."""
    written = body(good)["spec"]["resources"]["affinity"]
    spec = FineTuneJobSpec.model_validate(body(good)["spec"])
    assert spec.to_wire()["resources"]["affinity"] == written


@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_each_crd_fits_kubectl_applys_last_applied_annotation(path: Path) -> None:
    """Client-side `kubectl apply -f crds/` keeps the whole CRD in one annotation, and all
    annotations of an object together may hold 262144 bytes."""
    crd = yaml.safe_load(path.read_text())
    assert len(json.dumps(crd, separators=(",", ":"))) < 200_000
