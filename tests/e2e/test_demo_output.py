"""What the demo prints: kubectl-style tables from the CRDs' printer columns, live progress."""

from __future__ import annotations

import io

import pytest
from finetune_local.demo import (
    CRD_DIR,
    _Display,
    failure_message,
    format_table,
    kubectl_table,
    printer_columns,
    progress_row,
)
from finetune_local.localrun import LocalRunError, local_path, parse_pvc_mappings

FTJ = {
    "metadata": {"name": "quickstart", "creationTimestamp": "2020-01-01T00:00:00Z"},
    "spec": {"method": "lora", "baseModel": {"uri": "pvc://c/models/tiny"}},
    "status": {
        "phase": "Training",
        "gatesSummary": None,
        "progress": {"step": 12, "totalSteps": 60, "percent": 20, "loss": 1.23456,
                     "tokensPerSecond": 512.4, "etaSeconds": 40},
    },
}  # fmt: skip


def test_tables_follow_the_crd_printer_columns() -> None:
    columns = printer_columns(CRD_DIR / "finetunejobs.yaml")
    assert [name for name, _ in columns][:3] == ["Phase", "Method", "Base"]
    table = kubectl_table([FTJ], columns, "finetunejob.finetune.dev").splitlines()
    assert table[0].split()[:4] == ["NAME", "PHASE", "METHOD", "BASE"]
    row = table[1].split()
    assert row[:4] == [
        "finetunejob.finetune.dev/quickstart",
        "Training",
        "lora",
        "pvc://c/models/tiny",
    ]
    assert "20" in row and "1.235" in row and "<none>" in row  # percent, loss, no gates yet


def test_progress_row_and_live_redraw() -> None:
    row = progress_row(FTJ, None)
    assert row == ["quickstart", "Training", "12/60", "1.235", "512", "40s", "Waiting"]
    out = io.StringIO()
    display = _Display(out, live=True)
    display.progress(FTJ, None)
    display.progress(FTJ, None)  # unchanged: nothing is written
    moved = {**FTJ, "status": {**FTJ["status"], "phase": "Evaluating"}}
    display.progress(moved, {"status": {"phase": "Pending"}})
    text = out.getvalue()
    assert text.count("FINETUNEJOB") == 2
    assert "\x1b[2F\x1b[J" in text  # the two-line table is redrawn in place
    lines = io.StringIO()
    _Display(lines, live=False).progress(FTJ, None)
    assert lines.getvalue() == (
        "  phase=Training step=12/60 loss=1.235 tokens/s=512 eta=40s adapterdeployment=Waiting\n"
    )


def test_format_table_pads_columns() -> None:
    assert format_table(["a", "bb"], [["xxx", None]]) == "A     BB\nxxx   <none>"


def test_failure_message_names_the_failed_condition() -> None:
    obj = {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DataUnusable", "message": "too few rows"},
    ]}}  # fmt: skip
    assert failure_message(obj) == "DataUnusable: too few rows"


def test_local_mode_maps_pvc_and_file_uris_and_refuses_others(tmp_path) -> None:
    pvcs = parse_pvc_mappings([f"models={tmp_path}"])
    assert local_path("pvc://models/a/b", pvcs, "x") == tmp_path / "a/b"
    assert str(local_path("file:///data/x.jsonl", pvcs, "x")) == "/data/x.jsonl"
    with pytest.raises(LocalRunError, match="--pvc other=DIR"):
        local_path("pvc://other/a", pvcs, "spec.baseModel.uri")
    with pytest.raises(LocalRunError, match="finetune-trainer fetch"):
        local_path("hf://org/model", pvcs, "spec.baseModel.uri")
    with pytest.raises(LocalRunError, match="CLAIM=DIR"):
        parse_pvc_mappings(["nodir"])


def test_the_demo_schedule_cycle_data_and_manifests() -> None:
    """The schedule cycle's inputs: a fixed eval set with every intent, a first training file
    without shipping tickets (the new data brings them), manifests the CRDs accept."""
    import json

    import yaml
    from finetune_local.demo import EXAMPLES
    from finetune_local.demo_schedule import (
        EVAL_ROWS,
        NEW_INTENT,
        schedule_manifest,
        serving_manifests,
        split_rows,
    )
    from support.crdcheck import validate

    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()
    eval_rows, first, new = split_rows(lines)

    def intent(line: str) -> str | None:
        completion = json.loads(line)["completion"]
        return json.loads(completion).get("intent") if completion.startswith("{") else None

    assert len(eval_rows) == EVAL_ROWS and len(first) + len(new) == len(lines) - EVAL_ROWS
    assert NEW_INTENT in {intent(r) for r in eval_rows}
    assert NEW_INTENT not in {intent(r) for r in first} and new
    assert {intent(r) for r in new} == {NEW_INTENT}
    quickstart = yaml.safe_load((EXAMPLES / "finetunejob.yaml").read_text())
    sched = schedule_manifest(quickstart, "finetune-quickstart", "default")
    for doc in [sched, *serving_manifests(EXAMPLES / "serving.yaml", "default")]:
        if doc["kind"] != "Deployment":
            assert validate(doc) == [], doc["kind"]
    assert sched["spec"]["promotion"]["policy"] == "BeatChampion"
