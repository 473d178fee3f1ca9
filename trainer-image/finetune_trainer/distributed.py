"""Data-parallel training: the torchrun launcher, rank facts and the rules of who writes.

``finetune-trainer train`` starts as one plain process. When more than one process is
wanted (``--nproc-per-node`` above 1, ``--nnodes`` above 1, or a config asking for several
GPUs with no ``WORLD_SIZE`` set yet), it becomes a *launcher*: it runs
``python -m torch.distributed.run`` with the same command line, waits for it, and turns the
workers' outcomes into one exit code and one result. Each worker is an ordinary
``finetune-trainer train`` process with ``RANK``/``WORLD_SIZE`` set by torchrun; transformers'
Trainer wraps the model in DistributedDataParallel from those variables.

Rules every worker follows (see docs/distributed.md):

- every rank prepares the data itself (deterministic for a seed, so every rank holds the
  same rows) and trains; only global rank 0 writes files (data report, adapter, manifest,
  metrics, report) and prints protocol lines or the termination message;
- ``training.gradientAccumulation`` is divided by the world size (rounded up), so the global
  batch stays what the spec describes for one GPU;
- rank 0 tidies the checkpoint folder; every other rank only reads it and picks the same
  checkpoint (the newest complete one of this run), so all ranks resume together.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Set by the launcher for its workers: a folder where each rank records its outcome.
EXIT_DIR_ENV = "FINETUNE_EXIT_DIR"
DEFAULT_MASTER_PORT = 29500
# How long a node waits for the rank-0 pod's name to resolve (pods start in any order).
MASTER_DNS_TIMEOUT_ENV = "FINETUNE_MASTER_DNS_TIMEOUT_SECONDS"
DEFAULT_MASTER_DNS_TIMEOUT = 600.0
# Collective timeout: a rank stuck waiting for a dead peer gives up after this long.
DDP_TIMEOUT_ENV = "FINETUNE_DDP_TIMEOUT_SECONDS"
DEFAULT_DDP_TIMEOUT = 900


# ---------------------------------------------------------------- who am I


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (all 0/1 when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        return default


def world(env: Mapping[str, str] | None = None) -> World:
    """Rank facts from torchrun's environment variables."""
    env = os.environ if env is None else env
    size = _int_env(env, "WORLD_SIZE", 1)
    return World(
        rank=_int_env(env, "RANK", 0),
        local_rank=_int_env(env, "LOCAL_RANK", 0),
        world_size=size,
        local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", size),
    )


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """True for global rank 0 and for any process outside a distributed run."""
    return world(env).is_main


def ddp_timeout_seconds(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return max(60, _int_env(env, DDP_TIMEOUT_ENV, DEFAULT_DDP_TIMEOUT))


# ---------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch, accumulation and the resulting global batch for one world size."""

    micro_batch: int
    accumulation: int
    world_size: int
    requested_global: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def note(self) -> str | None:
        """A sentence for the report when the global batch differs from the spec's."""
        if self.global_batch == self.requested_global:
            return None
        return (
            f"global batch is {self.global_batch} (batchSize {self.micro_batch} x "
            f"gradientAccumulation {self.accumulation} x {self.world_size} processes), not "
            f"the {self.requested_global} the spec gives for one GPU: make "
            "training.gradientAccumulation a multiple of the number of GPUs to keep it equal"
        )


def plan_batch(micro_batch: int, gradient_accumulation: int, world_size: int) -> BatchPlan:
    """Divide accumulation among the processes so the global batch stays the spec's.

    ``batchSize x gradientAccumulation`` is the batch one optimiser step sees on one GPU.
    With ``world_size`` processes each one accumulates ``ceil(gradientAccumulation /
    world_size)`` micro-batches; the global batch is then exactly the spec's when the world
    size divides the accumulation, and the nearest larger multiple otherwise.
    """
    world_size = max(1, world_size)
    accumulation = max(1, math.ceil(gradient_accumulation / world_size))
    return BatchPlan(
        micro_batch=micro_batch,
        accumulation=accumulation,
        world_size=world_size,
        requested_global=micro_batch * gradient_accumulation,
    )


# ---------------------------------------------------------------- resume


def select_resume(checkpoint_dir: str | Path, fingerprint: str) -> Path | None:
    """The checkpoint rank 0 will resume from, found without changing anything on disk.

    Rank 0 runs ``checkpoints.prepare_for_resume`` (which removes incomplete checkpoints and
    moves other runs' aside); it never touches a complete checkpoint of this run, so reading
    the newest one of those here gives the same answer on every rank, in any order.
    """
    from .checkpoints import is_complete, list_checkpoints, read_marker

    for ckpt in list_checkpoints(checkpoint_dir):
        if is_complete(ckpt) and read_marker(ckpt).get("fingerprint") == fingerprint:
            return ckpt
    return None


# ---------------------------------------------------------------- launching


@dataclass(frozen=True)
class Launch:
    """How to start the workers: torchrun's own options (static rendezvous)."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        # Static rendezvous: the node rank is the pod's completion index, so global rank 0
        # always runs in pod 0, whose log the operator reads.
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
            "--max-restarts=0",
        ]


def plan_launch(
    *,
    nproc_per_node: int | None,
    nnodes: int | None,
    node_rank: int | None,
    master_addr: str | None,
    master_port: int | None,
    requested_gpus: int,
    device: str,
    env: Mapping[str, str],
) -> Launch | None:
    """Whether this ``train`` call must start workers through torchrun, and how.

    None when it already is a worker (``WORLD_SIZE`` set) or when one process is all that is
    wanted. Without ``--nproc-per-node``, a config asking for several GPUs on a CUDA device
    starts one process per GPU.
    """
    if env.get("WORLD_SIZE"):
        return None
    nodes = nnodes or 1
    per_node = nproc_per_node
    if per_node is None:
        per_node = requested_gpus if device != "cpu" and requested_gpus > 1 else 1
    if nodes < 1 or per_node < 1:
        raise ValueError("--nnodes and --nproc-per-node must be at least 1")
    if nodes == 1 and per_node == 1:
        return None
    rank = node_rank if node_rank is not None else _int_env(env, "JOB_COMPLETION_INDEX", 0)
    if not 0 <= rank < nodes:
        raise ValueError(f"node rank {rank} is outside 0..{nodes - 1}")
    if nodes > 1 and not master_addr:
        raise ValueError("--master-addr is required with --nnodes above 1")
    return Launch(
        nproc_per_node=per_node,
        nnodes=nodes,
        node_rank=rank,
        master_addr=master_addr or "127.0.0.1",
        master_port=master_port or DEFAULT_MASTER_PORT,
    )


def strip_launch_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher's own options (workers must not relaunch)."""
    takes_value = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"}
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in takes_value:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def wait_for_address(
    host: str,
    timeout: float,
    *,
    resolve: Callable[[str], object] = socket.gethostbyname,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Block until ``host`` resolves: the rank-0 pod's DNS name appears once it is scheduled."""
    deadline = clock() + timeout
    while True:
        try:
            resolve(host)
            return
        except OSError as exc:
            if clock() >= deadline:
                raise TimeoutError(
                    f"the rank-0 address {host} did not resolve within {timeout:.0f}s ({exc})"
                ) from exc
            sleep(2.0)


@dataclass(frozen=True)
class RankOutcome:
    rank: int
    exit_code: int
    reason: str = ""
    message: str = ""


_noted_failure: dict[str, str] = {}


def note_failure(reason: str, message: str) -> None:
    """Remember why this process failed, for :func:`record_outcome`."""
    _noted_failure.update(reason=reason, message=message)


def record_outcome(exit_code: int, reason: str = "", message: str = "") -> None:
    """Called by each worker at exit: leave its outcome for the launcher."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    if exit_code != 0 and not reason:
        reason = _noted_failure.get("reason", "")
        message = message or _noted_failure.get("message", "")
    me = world()
    record = {"rank": me.rank, "exitCode": exit_code, "reason": reason, "message": message[:2000]}
    try:
        path = Path(folder) / f"rank-{me.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not record this rank's outcome in %s: %s", folder, exc)


def read_outcomes(folder: str | Path) -> dict[int, RankOutcome]:
    found: dict[int, RankOutcome] = {}
    for path in Path(folder).glob("rank-*.json"):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            found[int(raw["rank"])] = RankOutcome(
                rank=int(raw["rank"]),
                exit_code=int(raw["exitCode"]),
                reason=str(raw.get("reason") or ""),
                message=str(raw.get("message") or ""),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def combine_outcomes(
    torchrun_code: int, outcomes: Mapping[int, RankOutcome], training_failed_code: int
) -> tuple[int, RankOutcome | None]:
    """One exit code for the pod, and the rank whose failure explains it.

    Rank 0's own failure wins (it reported it already); otherwise the lowest failed rank's.
    A worker killed before it could record anything (signal, NCCL abort) counts as a
    training failure.
    """
    failed = sorted((o for o in outcomes.values() if o.exit_code != 0), key=lambda o: o.rank)
    if failed:
        return failed[0].exit_code, failed[0]
    if torchrun_code == 0:
        return 0, None
    return training_failed_code, None


def run_launcher(
    launch: Launch,
    worker_argv: Sequence[str],
    *,
    report_failure: Callable[[str, str, int], None],
    training_failed_code: int,
) -> int:
    """Start torchrun with ``worker_argv`` and return one exit code for all workers.

    ``report_failure(reason, message, exit_code)`` is called when the workers failed and
    rank 0 did not report a result itself, so the operator always finds one.
    """
    if launch.nnodes > 1 and launch.node_rank > 0:
        timeout = float(os.environ.get(MASTER_DNS_TIMEOUT_ENV, "") or DEFAULT_MASTER_DNS_TIMEOUT)
        wait_for_address(launch.master_addr, timeout)
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as folder:
        env = dict(os.environ)
        env[EXIT_DIR_ENV] = folder
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *launch.torchrun_args(),
            "-m",
            "finetune_trainer.cli",
            *worker_argv,
        ]
        log.info(
            "starting %d worker(s) on node %d of %d (world size %d)",
            launch.nproc_per_node,
            launch.node_rank,
            launch.nnodes,
            launch.world_size,
        )
        proc = subprocess.Popen(cmd, env=env)
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        outcomes = read_outcomes(folder)
    exit_code, culprit = combine_outcomes(code, outcomes, training_failed_code)
    # Every pod's termination message names the failure it saw (the operator reads the
    # first pod that failed); rank 0 reports its own, so only fill in when it did not.
    if exit_code != 0 and 0 not in outcomes:
        if culprit is not None:
            message = f"rank {culprit.rank} failed: {culprit.message or culprit.reason}"
            report_failure(culprit.reason or "TrainingFailed", message, exit_code)
        else:
            report_failure(
                "TrainingFailed",
                f"a training process was killed (torchrun exit code {code}); read the logs of "
                "every trainer pod: a peer may have died or run out of host memory",
                exit_code,
            )
    return exit_code
