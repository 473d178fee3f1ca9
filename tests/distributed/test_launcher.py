"""The trainer's launcher decisions and rank rules (pure parts, no processes started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_trainer import distributed as d
from finetune_trainer.checkpoints import write_marker


def test_world_reads_torchrun_variables() -> None:
    me = d.world({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"})
    assert (me.rank, me.local_rank, me.world_size, me.local_world_size) == (3, 1, 8, 2)
    assert me.distributed and not me.is_main
    assert d.world({}) == d.World()
    assert d.is_main_process({}) and d.is_main_process({"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("batch", "accumulation", "world", "per_process", "global_batch", "exact"),
    [
        (4, 8, 1, 8, 32, True),  # one GPU: unchanged
        (4, 8, 2, 4, 32, True),  # divided: the same global batch
        (4, 8, 8, 1, 32, True),
        (4, 6, 4, 2, 32, False),  # not a multiple: rounded up
        (2, 1, 2, 1, 4, False),  # cannot accumulate less than one micro-batch
    ],
)
def test_accumulation_is_divided_by_the_world_size(
    batch: int, accumulation: int, world: int, per_process: int, global_batch: int, exact: bool
) -> None:
    plan = d.plan_batch(batch, accumulation, world)
    assert plan.accumulation == per_process
    assert plan.global_batch == global_batch
    assert (plan.note() is None) == exact
    if not exact:
        assert "multiple of the number of GPUs" in str(plan.note())


def launch(**kw: object) -> d.Launch | None:
    args: dict[str, object] = {
        "nproc_per_node": None,
        "nnodes": None,
        "node_rank": None,
        "master_addr": None,
        "master_port": None,
        "requested_gpus": 1,
        "device": "cuda",
        "env": {},
    }
    args.update(kw)
    return d.plan_launch(**args)  # type: ignore[arg-type]


def test_launch_decisions() -> None:
    assert launch() is None  # one GPU: train in this process
    assert launch(requested_gpus=4, env={"WORLD_SIZE": "4"}) is None  # already a worker
    auto = launch(requested_gpus=4)
    assert auto is not None and auto.world_size == 4 and auto.nnodes == 1
    assert launch(requested_gpus=4, device="cpu") is None  # CPU: one process unless asked
    cpu = launch(nproc_per_node=2, device="cpu")
    assert cpu is not None and cpu.nproc_per_node == 2
    multi = launch(
        nproc_per_node=8,
        nnodes=2,
        master_addr="job-0.svc",
        env={"JOB_COMPLETION_INDEX": "1"},
    )
    assert multi is not None
    assert multi.torchrun_args() == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=1",
        "--master-addr=job-0.svc",
        "--master-port=29500",
        "--max-restarts=0",
    ]
    with pytest.raises(ValueError, match="master-addr"):
        launch(nproc_per_node=1, nnodes=2)
    with pytest.raises(ValueError, match="outside"):
        launch(nnodes=2, master_addr="x", env={"JOB_COMPLETION_INDEX": "2"})


def test_workers_get_the_command_line_without_launcher_options() -> None:
    argv = ["-v", "train", "--config", "c.yaml", "--nproc-per-node", "2", "--nnodes=2"]
    argv += ["--master-addr", "h", "--no-eval", "--master-port=1", "--node-rank", "0"]
    assert d.strip_launch_options(argv) == ["-v", "train", "--config", "c.yaml", "--no-eval"]


def test_outcomes_combine_into_one_exit_code() -> None:
    ok = d.RankOutcome(0, 0)
    assert d.combine_outcomes(0, {0: ok, 1: d.RankOutcome(1, 0)}, 4) == (0, None)
    data = d.RankOutcome(1, 3, "DataUnusable", "too few rows")
    assert d.combine_outcomes(1, {0: d.RankOutcome(0, 3), 1: data}, 4)[0] == 3
    code, culprit = d.combine_outcomes(1, {1: data, 2: d.RankOutcome(2, 4)}, 4)
    assert (code, culprit) == (3, data)
    assert d.combine_outcomes(1, {}, 4) == (4, None)  # killed before recording anything


def test_record_and_read_outcomes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(d.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d.note_failure("OutOfMemory", "out of GPU memory")
    d.record_outcome(4)
    assert d.read_outcomes(tmp_path) == {1: d.RankOutcome(1, 4, "OutOfMemory", "out of GPU memory")}


def test_wait_for_address_retries_until_the_name_resolves() -> None:
    calls: list[str] = []
    clock = iter(range(100))

    def resolve(host: str) -> str:
        calls.append(host)
        if len(calls) < 3:
            raise OSError("Name or service not known")
        return "10.0.0.1"

    d.wait_for_address(
        "job-0.svc", 60, resolve=resolve, sleep=lambda _: None, clock=lambda: next(clock)
    )
    assert calls == ["job-0.svc"] * 3

    def never(host: str) -> str:
        raise OSError("Name or service not known")

    with pytest.raises(TimeoutError, match=r"job-0\.svc"):
        d.wait_for_address(
            "job-0.svc", 5, resolve=never, sleep=lambda _: None, clock=lambda: next(clock)
        )


def test_every_rank_selects_the_checkpoint_rank0_resumes(tmp_path: Path) -> None:
    from finetune_trainer.checkpoints import prepare_for_resume

    root = tmp_path / "checkpoints"
    for step, fingerprint, complete in [
        (2, "sha256:run", True),
        (4, "sha256:run", True),
        (6, "sha256:run", False),  # killed mid-save
        (8, "sha256:other", True),  # another run's
    ]:
        ckpt = root / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        if complete:
            write_marker(ckpt, fingerprint, step)
    before = sorted(p.name for p in root.iterdir())
    chosen = d.select_resume(root, "sha256:run")
    assert sorted(p.name for p in root.iterdir()) == before  # read only
    assert chosen is not None and chosen.name == "checkpoint-4"
    assert prepare_for_resume(root, "sha256:run") == chosen
    assert d.select_resume(root, "sha256:run") == chosen  # same answer after rank 0 tidied
    assert d.select_resume(root, "sha256:new") is None
