"""The namespace GPU count: kopf's index of unfinished runs plus this process's reservations."""

from __future__ import annotations

import pytest
from finetune_operator.handlers import gpu_usage
from finetune_operator.handlers.gpu_usage import GpuLedger, spec_gpus


def gpus(n: int, nodes: int = 1) -> dict[str, object]:
    return {"resources": {"gpus": n, "nodes": nodes}}


def test_spec_gpus_reads_the_raw_spec_defensively() -> None:
    assert spec_gpus({}) == 1  # the API's defaults: one GPU, one node
    assert spec_gpus(gpus(4, nodes=2)) == 8
    assert spec_gpus(gpus(0)) == 0
    assert spec_gpus({"resources": {"gpus": "8"}}) == 0  # not a count: counts nothing
    assert spec_gpus({"resources": {"gpus": True}}) == 0


def test_usage_merges_the_index_and_fresh_reservations_without_the_job_itself() -> None:
    ledger = GpuLedger()
    index: dict[str, list[tuple[str, int]]] = {"team-a": [("a", 2)], "team-b": [("x", 8)]}
    ledger.index = index
    ledger.reserve("team-a", "b", gpus(1))
    ledger.reserve("team-a", "c", gpus(0))  # CPU runs hold nothing
    assert ledger.usage("team-a", "new").gpus_by_job == {"a": 2, "b": 1}
    assert ledger.usage("team-a", "a").gpus_by_job == {"b": 1}
    # Once the index has the run, the reservation goes: a finished run then stops counting.
    index["team-a"].append(("b", 1))
    assert ledger.usage("team-a", "new").gpus == 3
    index["team-a"] = [("a", 2)]
    assert ledger.usage("team-a", "new").gpus_by_job == {"a": 2}
    assert ledger.reservations == {}


def test_reservations_end_when_released_or_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = GpuLedger()
    ledger.reserve("ns", "rejected", gpus(2))
    ledger.release("ns", "rejected")  # the API server refused its Job
    assert ledger.usage("ns", "other").gpus == 0
    ledger.reserve("ns", "lost", gpus(2))
    assert ledger.usage("ns", "other").gpus == 2
    monkeypatch.setattr(gpu_usage, "RESERVATION_SECONDS", -1.0)
    assert ledger.usage("ns", "other").gpus == 0  # its status never reached the index
