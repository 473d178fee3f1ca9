"""``finetune-local run``: one FineTuneJob on this machine, no cluster.

The same steps the operator takes, in the same order and with the same code: the spec is
validated by the API models, the preflight estimate comes from the operator's planner
(:func:`~finetune_operator.planners.finetunejob.check_fit`, with this machine's GPU memory
when there is one), the trainer configuration is built by the same builder the operator
uses for the trainer ConfigMap, ``finetune-trainer train`` runs it (data report, training,
evaluation, manifest) as a subprocess, and the quality gates are evaluated by
:mod:`finetune_operator.domain.gates`. Only the paths differ: ``file://`` URIs are used as they
are and ``pvc://CLAIM/path`` URIs map to ``--pvc CLAIM=DIR`` folders.

Exit codes: 0 gates passed, 1 gates failed, 2 bad manifest or options, otherwise the
trainer's exit code (3 data unusable, 4 training failed, 5 evaluation failed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from finetune_operator.api.finetunejob import FineTuneJob, FineTuneJobSpec
from finetune_operator.api.trainer_config import PROGRESS_PREFIX, ResolvedPaths, TrainerConfig
from finetune_operator.builders.trainer import resolve_trainer_config
from finetune_operator.config import OperatorConfig, load_config
from finetune_operator.domain.gates import evaluate_gates, summarize
from finetune_operator.domain.uris import StorageUri, UriError
from finetune_operator.planners.finetunejob import FitResult, check_fit
from pydantic import ValidationError

EXIT_GATES_FAILED = 1
EXIT_USAGE = 2


class LocalRunError(ValueError):
    """The manifest or the options cannot be run locally; the message says what to change."""


@dataclass
class LocalRunResult:
    exit_code: int
    result: dict[str, Any]
    gates: list[dict[str, Any]]
    gates_passed: bool
    summary: str
    output_dir: Path
    trainer_config: TrainerConfig
    fit: FitResult


# ---------------------------------------------------------------- pure parts


def parse_pvc_mappings(values: Sequence[str]) -> dict[str, Path]:
    """``["claim=/dir", ...]`` → {claim: Path}."""
    mappings: dict[str, Path] = {}
    for value in values:
        claim, sep, directory = value.partition("=")
        if not sep or not claim or not directory:
            raise LocalRunError(
                f"--pvc {value!r}: expected CLAIM=DIR, e.g. --pvc models=/data/models"
            )
        mappings[claim] = Path(directory).expanduser().resolve()
    return mappings


def trainer_root() -> str:
    """The folder holding ``finetune_trainer``, for the PYTHONPATH of trainer subprocesses."""
    import finetune_trainer

    return str(Path(finetune_trainer.__file__).resolve().parent.parent)


def local_path(uri: str, pvcs: Mapping[str, Path], field: str) -> Path:
    """The local file or folder for a ``file://`` or ``pvc://`` URI."""
    try:
        parsed = StorageUri.parse(uri)
    except UriError as exc:
        raise LocalRunError(f"{field}: {exc}") from None
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "pvc":
        if parsed.claim not in pvcs:
            raise LocalRunError(
                f"{field} is {uri}: map the claim to a folder with --pvc {parsed.claim}=DIR"
            )
        return pvcs[parsed.claim] / parsed.path
    raise LocalRunError(
        f"{field} is {uri}: local mode reads file:// and pvc:// only; download the "
        f"{parsed.scheme}:// "
        "source first (`finetune-trainer fetch --uri ... --dest DIR`) and point "
        "the manifest at it"
    )


def load_manifest(path: Path) -> tuple[str, str, FineTuneJobSpec, dict[str, str]]:
    """(name, namespace, spec, annotations) of the one FineTuneJob in a YAML file."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise LocalRunError(f"{path}: cannot read the manifest: {exc}") from exc
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise LocalRunError(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
    try:
        job = FineTuneJob.model_validate(jobs[0])
    except ValidationError as exc:
        lines = [
            f"  spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        ]
        raise LocalRunError(f"{path}: the FineTuneJob is invalid:\n" + "\n".join(lines)) from exc
    meta = jobs[0].get("metadata") or {}
    return (
        str(meta.get("name") or path.stem),
        str(meta.get("namespace") or "default"),
        job.spec,
        {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
    )


def local_trainer_config(
    name: str,
    namespace: str,
    spec: FineTuneJobSpec,
    fit: FitResult,
    config: OperatorConfig,
    paths: ResolvedPaths,
    device: str,
    termination_log: Path,
) -> TrainerConfig:
    """The operator's trainer configuration for this spec, with local paths."""
    resolved = resolve_trainer_config(
        name,
        namespace,
        1,
        spec,
        batch_size=fit.batch,
        gradient_checkpointing=fit.gradient_checkpointing,
        config=config,
    )
    return resolved.model_copy(
        update={
            "paths": paths,
            "termination_log": str(termination_log),
            "device": device if device != "auto" else resolved.device,
        }
    )


def last_result(output: str) -> dict[str, Any] | None:
    """The last ``result`` line the trainer printed."""
    found = None
    for line in output.splitlines():
        if line.startswith(PROGRESS_PREFIX):
            with_json = line[len(PROGRESS_PREFIX) :]
            try:
                obj = json.loads(with_json)
            except ValueError:
                continue
            if obj.get("type") == "result":
                found = obj
    return found


# ---------------------------------------------------------------- I/O


def read_model_config(model_dir: Path) -> tuple[dict[str, Any], str] | None:
    """The base model's ``config.json`` from its local folder, for the preflight's shape."""
    config_file = model_dir / "config.json"
    try:
        parsed = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (parsed, str(model_dir)) if isinstance(parsed, dict) else None


def choose_device(
    spec: FineTuneJobSpec, device: str, gpu_gib: float | None
) -> tuple[FineTuneJobSpec, str, str | None]:
    """(spec to run, device, warning) on this machine.

    A job that asks for GPUs runs on the CPU when none is visible and no device was forced,
    with a warning, as one process (``resources.gpus: 0``). QLoRA cannot: its 4-bit base
    weights need a CUDA GPU, so the user is told what to do instead.
    """
    wants_gpu = spec.resources.gpus > 0
    if gpu_gib is not None or device == "cpu" or (device == "auto" and not wants_gpu):
        if device == "cpu" and wants_gpu:
            return _on_cpu(spec), "cpu", None
        return spec, device, None
    if device == "cuda" or spec.method == "qlora":
        why = "--device cuda" if device == "cuda" else "method: qlora (4-bit weights need CUDA)"
        raise LocalRunError(
            f"no CUDA GPU is visible on this machine, and {why}. Run it where a GPU is, or "
            "train on the CPU: set method: lora and run with --device cpu (small models only)"
        )
    warning = (
        f"warning: the job asks for resources.gpus: {spec.resources.gpus} but no CUDA GPU is "
        "visible here: training on the CPU, as one process (slow; pass --device cuda to fail "
        "instead, --device cpu to silence this)"
    )
    return _on_cpu(spec), "cpu", warning


def _on_cpu(spec: FineTuneJobSpec) -> FineTuneJobSpec:
    resources = spec.resources.model_copy(update={"gpus": 0, "nodes": 1})
    return spec.model_copy(update={"resources": resources})


def local_gpu_memory_gib() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory) / 2**30


def _show_progress(line: str, out: TextIO) -> None:
    try:
        obj = json.loads(line[len(PROGRESS_PREFIX) :])
    except ValueError:
        return
    kind = obj.get("type")
    if kind == "progress":
        loss = obj.get("loss")
        out.write(
            f"  step {obj.get('step')}/{obj.get('totalSteps')}"
            + (f"  loss {loss:.4f}" if isinstance(loss, int | float) else "")
            + (f"  {obj['tokensPerSecond']:.0f} tokens/s" if obj.get("tokensPerSecond") else "")
            + "\n"
        )
    elif kind == "data":
        r = obj.get("report") or {}
        out.write(
            f"data: {r.get('rowsRead')} rows read, {r.get('rowsKept')} kept "
            f"({r.get('trainRows')} train / {r.get('evalRows')} eval), "
            f"{r.get('duplicates')} duplicates, {r.get('piiMasked')} PII masked, "
            f"dropped {r.get('dropped')}; digest {r.get('digest')}\n"
        )
    out.flush()


def run_local(
    manifest: Path,
    pvc: Sequence[str] = (),
    output: str | None = None,
    device: str = "auto",
    *,
    out: TextIO = sys.stdout,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> LocalRunResult:
    """Run one FineTuneJob manifest here; raises :class:`LocalRunError` for bad input."""
    name, namespace, spec, annotations = load_manifest(manifest)
    pvcs = parse_pvc_mappings(pvc)
    out_dir = (
        Path(output).expanduser().resolve()
        if output
        else local_path(spec.output.uri, pvcs, "spec.output.uri")
    )
    paths = ResolvedPaths(
        base_model=str(local_path(spec.base_model.uri, pvcs, "spec.baseModel.uri")),
        train_data=str(local_path(spec.dataset.train.uri, pvcs, "spec.dataset.train.uri")),
        eval_data=(
            str(local_path(spec.dataset.eval.uri, pvcs, "spec.dataset.eval.uri"))
            if spec.dataset.eval is not None
            else None
        ),
        output_dir=str(out_dir),
    )
    compare = spec.evaluation.compare_with
    if compare is not None:
        where = "spec.evaluation.compareWith.uri"
        paths.compared_adapter = str(local_path(compare.uri, pvcs, where))
    for label, value in (("base model", paths.base_model), ("training data", paths.train_data)):
        if not Path(value).exists():
            raise LocalRunError(f"the {label} {value} does not exist: fix the URI or --pvc")

    config = load_config()
    gpu = local_gpu_memory_gib()
    if gpu is not None:
        config = dataclasses.replace(config, default_gpu_memory_gib=gpu)
    spec, device, warning = choose_device(spec, device, gpu)
    if warning:
        out.write(warning + "\n")
    model_config = read_model_config(Path(paths.base_model))
    fit = check_fit(spec, annotations, config, model_config)
    out.write(f"preflight: Fits={fit.status} ({fit.reason}): {fit.message}\n")
    if fit.status == "False":
        raise LocalRunError(f"the job does not fit this machine's GPU: {fit.message}")

    out_dir.mkdir(parents=True, exist_ok=True)
    termination = out_dir / "termination-log.json"
    termination.unlink(missing_ok=True)
    trainer_config = local_trainer_config(
        name, namespace, spec, fit, config, paths, device, termination
    )
    config_file = out_dir / "job.yaml"
    config_file.write_text(
        yaml.safe_dump(trainer_config.to_wire(), sort_keys=True), encoding="utf-8"
    )
    out.write(f"training {name}: output in {out_dir}\n")
    out.flush()
    process_env = dict(os.environ if env is None else env)
    roots = [str(Path(__file__).resolve().parents[1]), trainer_root()]
    process_env["PYTHONPATH"] = os.pathsep.join(
        [*roots, *filter(None, [process_env.get("PYTHONPATH")])]
    )
    process_env["PYTHONUNBUFFERED"] = "1"
    process_env.setdefault("HF_HUB_OFFLINE", "1")
    stderr_file = out_dir / "trainer.stderr.log"
    with stderr_file.open("w", encoding="utf-8") as stderr_sink:
        # stderr goes to a file: a pipe read only at the end could fill up and block.
        process = subprocess.Popen(
            [python, "-m", "finetune_trainer.cli", "train", "--config", str(config_file)],
            stdout=subprocess.PIPE,
            stderr=stderr_sink,
            env=process_env,
            text=True,
        )
        assert process.stdout is not None
        captured: list[str] = []
        for line in process.stdout:
            captured.append(line)
            if line.startswith(PROGRESS_PREFIX):
                _show_progress(line, out)
        code = process.wait()
    (out_dir / "trainer.log").write_text("".join(captured), encoding="utf-8")
    stderr_tail = stderr_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()

    result: dict[str, Any] | None = None
    if termination.is_file():
        try:
            result = json.loads(termination.read_text(encoding="utf-8"))
        except ValueError:
            result = None
    full = last_result("".join(captured))
    if full is not None:
        result = full  # the log line keeps what the 4 KiB termination message may drop
    if code != 0 or result is None or not result.get("ok"):
        reason = (result or {}).get("reason", "TrainingFailed")
        message = (result or {}).get("message") or (stderr_tail[-1] if stderr_tail else "no result")
        out.write(f"FAILED {reason}: {message}\n")
        return LocalRunResult(
            exit_code=code or 4, result=result or {}, gates=[], gates_passed=False,
            summary="", output_dir=out_dir, trainer_config=trainer_config, fit=fit,
        )  # fmt: skip

    gates = [dict(g) for g in evaluate_gates(
        spec.quality_gates, result.get("metrics") or {}, result.get("baseMetrics")
    )]  # fmt: skip
    passed, summary, message = summarize(gates)
    verdicts = {"gates": gates, "passed": passed, "summary": summary, "message": message}
    (out_dir / "gates.json").write_text(json.dumps(verdicts, indent=2) + "\n", encoding="utf-8")
    adapter = result.get("adapter") or {}
    out.write(f"\nadapter: {paths.output_dir}/adapter  digest {adapter.get('digest')}\n")
    out.write("quality gates:\n")
    for gate in gates:
        gate_value = gate.get("value")
        shown = f"{gate_value:.4g}" if isinstance(gate_value, int | float) else "missing"
        verdict = "PASS" if gate.get("passed") else "FAIL"
        out.write(f"  {verdict}  {gate.get('metric')} = {shown} (threshold {gate.get('threshold')})"
                  + (f"  {gate.get('reason')}" if gate.get("reason") else "") + "\n")  # fmt: skip
    out.write(f"gates {summary}" + ("" if passed else f": {message}") + "\n")
    out.write(f"report: {out_dir / 'report.md'}\n")
    return LocalRunResult(
        exit_code=0 if passed else EXIT_GATES_FAILED, result=result, gates=gates,
        gates_passed=passed, summary=summary, output_dir=out_dir,
        trainer_config=trainer_config, fit=fit,
    )  # fmt: skip


def run_cli(manifest: str, pvc: Sequence[str], output: str | None, device: str) -> int:
    try:
        return run_local(Path(manifest), pvc, output, device).exit_code
    except LocalRunError as exc:
        print(f"finetune-local run: {exc}", file=sys.stderr)
        return EXIT_USAGE
