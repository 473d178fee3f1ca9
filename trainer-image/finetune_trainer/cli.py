"""``finetune-trainer``: the command the trainer pod runs (and people run by hand).

Subcommands: ``train``, ``evaluate``, ``data-report``, ``make-tiny-model``. Exit codes:
0 ok, 2 bad config/usage (also an s3:// output that refuses the upload: missing bucket,
rejected credentials, access denied), 3 data unusable, 4 training failed, 5 evaluation
failed, 6 upload failed in a way a retry may fix (network, throttling, server errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_operator.api.trainer_config import TrainerConfig
from finetune_operator.api.trainer_output import AdapterOutput
from finetune_operator.domain.uris import StorageUri

from .errors import (
    EXIT_DATA,
    EXIT_EVALUATION,
    EXIT_OK,
    EXIT_TRAINING,
    TrainerError,
    evaluation_failed,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .data import PreparedData
    from .remote_checkpoints import CheckpointSync
    from .train import TrainOutcome

log = logging.getLogger("finetune_trainer")


def _setup(verbose: bool = False) -> None:
    # The trainer never talks to a model hub: models and data are local paths.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before torch is imported. Packed micro-batches vary in size from step to step; with
    # fixed-size segments the caching allocator then reserved up to 1.9x what was allocated
    # (Qwen2.5-0.5B, 16,384 tokens: 43.3 GiB reserved for 23.3 GiB allocated, 24.0 GiB with
    # expandable segments; docs/benchmarks.md). The memory planner assumes little slack.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:  # the operator image ships this package without the ML stack
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


def _finite_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ data step


def run_data_step(config: TrainerConfig) -> tuple[PreTrainedTokenizerBase, PreparedData]:
    """Tokenizer + cleaned data; writes data_report.json/eval.jsonl and the data line."""
    from .data import load_tokenizer, prepare_data, write_data_outputs
    from .errors import data_not_found
    from .progress import emit

    spec = config.spec
    tokenizer, template_source = load_tokenizer(config.paths.base_model, spec.dataset.chat_template)
    eval_path = config.paths.eval_data
    if spec.dataset.eval is not None and not eval_path:
        raise data_not_found("dataset.eval is set but paths.evalData is empty: fetch the eval data")
    prepared = prepare_data(
        spec.dataset,
        config.paths.train_data,
        eval_path,
        tokenizer,
        spec.training.max_seq_length,
        spec.training.seed,
        template_source,
    )
    from .distributed import is_main_process

    if is_main_process():  # every rank prepares the same rows; one writes them
        write_data_outputs(prepared, config.paths.output_dir)
    emit({"type": "data", "report": prepared.report.to_wire()})
    return tokenizer, prepared


def check_data(config: TrainerConfig, prepared: PreparedData) -> None:
    from .data import check_usable

    check_usable(prepared.report, config.spec.dataset.cleaning)


# ------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config)
    launched = _launch_workers(args, config)
    if launched is not None:
        return launched
    data_wire: dict[str, Any] | None = None
    try:
        tokenizer, prepared = run_data_step(config)
        data_wire = prepared.report.to_wire()
        check_data(config, prepared)
        result = train_and_finish(config, tokenizer, prepared, evaluate=not args.no_eval)
    except TrainerError as err:
        _fail(config, err, data_wire)
        return err.exit_code
    except Exception as exc:
        log.exception("training failed")
        _fail(
            config,
            TrainerError("TrainingFailed", f"{type(exc).__name__}: {exc}", EXIT_TRAINING),
            data_wire,
        )
        return EXIT_TRAINING
    from .progress import report_result

    report_result(result, config.termination_log)
    return EXIT_OK


def _fail(config: TrainerConfig | None, err: TrainerError, data: dict[str, Any] | None) -> None:
    from .distributed import note_failure
    from .progress import report_result

    log.error("%s: %s", err.reason, err.message)
    note_failure(err.reason, err.message)
    result: dict[str, Any] = {"ok": False, "reason": err.reason, "message": err.message}
    if data is not None:
        result["data"] = data
    report_result(result, config.termination_log if config is not None else None)


def train_and_finish(
    config: TrainerConfig,
    tokenizer: PreTrainedTokenizerBase,
    prepared: PreparedData,
    evaluate: bool,
) -> dict[str, Any]:
    """Train, evaluate, write manifest/report/metrics; return the result object."""
    from .train import train_adapter

    started = time.monotonic()
    outcome = train_adapter(config, prepared, tokenizer)
    try:
        return _finish(config, tokenizer, prepared, outcome, evaluate, started)
    finally:
        if outcome.checkpoint_sync is not None:
            outcome.checkpoint_sync.close()  # a failed run still lets its last checkpoint land


def _finish(
    config: TrainerConfig,
    tokenizer: PreTrainedTokenizerBase,
    prepared: PreparedData,
    outcome: TrainOutcome,
    evaluate: bool,
    started: float,
) -> dict[str, Any]:
    """Evaluate, write manifest/report/metrics, upload; return the result object."""
    from .distributed import is_main_process
    from .evaluate import run_evaluation
    from .manifest import adapter_size_bytes, build_manifest, write_manifest
    from .report import write_report
    from .train import merge_adapter, resolve_device

    out = Path(config.paths.output_dir)
    if not is_main_process():
        # Rank 0 evaluates and writes every output; the other ranks are done.
        return {"ok": True, "reason": "Succeeded", "message": "worker finished"}
    metrics = dict(outcome.metrics)
    if "evalLoss" in metrics and metrics["evalLoss"] < 50:
        metrics["perplexity"] = math.exp(metrics["evalLoss"])
    base_metrics: dict[str, float] | None = None
    compared: dict[str, Any] = {}
    notes = list(outcome.notes)
    if evaluate:
        try:
            found = run_evaluation(
                config=config,
                model=outcome.model,
                tokenizer=tokenizer,
                adapter_dir=str(outcome.adapter_dir),
                eval_file=str(out / "eval.jsonl"),
            )
        except TrainerError:
            raise
        except Exception as exc:
            log.exception("evaluation failed")
            reason = getattr(exc, "reason", None)
            if isinstance(reason, str) and reason:
                message = str(getattr(exc, "message", exc))
                code = int(getattr(exc, "exit_code", EXIT_EVALUATION))
                raise TrainerError(reason, message, code) from exc
            raise evaluation_failed(f"evaluation failed: {type(exc).__name__}: {exc}") from exc
        metrics.update(found["metrics"] or {})
        base_metrics = dict(found["baseMetrics"]) if found["baseMetrics"] else None
        compared = _compared_fields(
            found["comparedMetrics"], found["comparedError"], found["comparedTimingComparable"]
        )
        notes += [n for n in found["notes"] if n.startswith("compareWith")]
    metrics = _finite_metrics(metrics)
    _write_json(out / "metrics.json", metrics)
    if base_metrics:
        base_metrics = _finite_metrics(base_metrics)
        _write_json(out / "base_metrics.json", base_metrics)

    manifest = build_manifest(
        outcome.adapter_dir,
        config.spec,
        prepared.report.digest,
        outcome.training_arguments,
        metrics,
    )
    write_manifest(outcome.adapter_dir, manifest)
    adapter_uri = config.spec.output.uri.rstrip("/") + "/adapter"
    adapter = AdapterOutput(
        uri=adapter_uri,
        digest=manifest["digest"],
        rank=config.spec.lora.r,
        size_bytes=adapter_size_bytes(outcome.adapter_dir),
        base_model=config.spec.base_model.uri,
        method=config.spec.method,
    )
    if config.spec.output.merge_and_unload:
        del outcome.model  # free the training copy before loading the full-precision base
        merge_adapter(
            config.paths.base_model,
            outcome.adapter_dir,
            out / "merged",
            config.spec.output.merged_dtype,
            resolve_device(config.device),
            config.spec.base_model.trust_remote_code,
        )
        adapter.merged_uri = config.spec.output.uri.rstrip("/") + "/merged"
    summary = {
        "steps": outcome.global_step,
        "resumedFrom": outcome.resumed_from,
        "wallSeconds": round(time.monotonic() - started, 1),
        **outcome.training_arguments,
    }
    write_report(
        out,
        config.job_name,
        outcome.log_history,
        prepared.report.to_wire(),
        summary,
        metrics,
        adapter.to_wire(),
        notes,
    )
    message = f"trained {outcome.global_step} steps; adapter digest {manifest['digest']}"
    if StorageUri.parse(config.spec.output.uri).scheme == "s3":
        uploaded = upload_run(
            config, outcome.adapter_dir, manifest["digest"], outcome.checkpoint_sync
        )
        message += f"; uploaded to {uploaded}"
    # The wire object: TrainerResult's fields plus what only people read (the full data
    # report, steps); the operator ignores those.
    result: dict[str, Any] = {
        "ok": True,
        "reason": "Succeeded",
        "message": message,
        "data": prepared.report.to_wire(),
        "metrics": metrics,
        "adapter": adapter.to_wire(),
        "steps": outcome.global_step,
    }
    if base_metrics:
        result["baseMetrics"] = base_metrics
    result.update(compared)
    return result


def _compared_fields(
    metrics: Mapping[str, float] | None, error: str | None, timing_comparable: bool | None
) -> dict[str, Any]:
    """comparedMetrics / comparedError of the result (evaluation.compareWith), and whether
    the compared timing metrics were measured as the adapter's (decision 2020)."""
    if metrics:
        fields: dict[str, Any] = {"comparedMetrics": _finite_metrics(metrics)}
        if timing_comparable is not None:
            fields["comparedTimingComparable"] = timing_comparable
        return fields
    if error:
        return {"comparedError": error}
    return {}


def upload_run(
    config: TrainerConfig,
    adapter_dir: Path,
    digest: str,
    checkpoint_sync: CheckpointSync | None = None,
) -> str:
    """Send the run to its s3:// output (the local adapter must still match its manifest).

    A checkpoint upload still running is waited for first; once the final upload verified,
    the run's remote checkpoints are removed (docs/decisions/1400-checkpoints-synced-to-s3.md).
    """
    from .errors import training_failed
    from .manifest import verify
    from .upload import upload_output

    if verify(adapter_dir) != digest:
        raise training_failed(f"{adapter_dir} changed after its manifest was written")
    if checkpoint_sync is not None:
        checkpoint_sync.wait()
    ref = config.spec.output.credentials_secret_ref
    sent = upload_output(config.spec.output.uri, config.paths.output_dir, ref.name if ref else None)
    if checkpoint_sync is not None:
        checkpoint_sync.remove_after_success()
    return str(sent["uri"])


def _launch_workers(args: argparse.Namespace, config: TrainerConfig) -> int | None:
    """Run as torchrun launcher when several processes are wanted; None: train here."""
    from . import distributed
    from .errors import invalid_config
    from .train import resolve_device

    try:
        launch = distributed.plan_launch(
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=args.master_port,
            requested_gpus=config.spec.resources.gpus,
            device=resolve_device(config.device) if config.device != "cpu" else "cpu",
            env=os.environ,
        )
    except ValueError as exc:
        raise invalid_config(str(exc)) from exc
    if launch is None:
        return None

    def report_failure(reason: str, message: str, exit_code: int) -> None:
        _fail(config, TrainerError(reason, message, exit_code), None)

    worker_argv = distributed.strip_launch_options(args.argv)
    return distributed.run_launcher(
        launch, worker_argv, report_failure=report_failure, training_failed_code=EXIT_TRAINING
    )


def cmd_data_report(args: argparse.Namespace) -> int:
    from .config import load_config
    from .progress import emit

    config = load_config(args.config)
    try:
        _tokenizer, prepared = run_data_step(config)
        check_data(config, prepared)
    except TrainerError as err:
        log.error("%s: %s", err.reason, err.message)
        emit({"type": "result", "ok": False, "reason": err.reason, "message": err.message})
        return err.exit_code
    print(json.dumps(prepared.report.to_wire(), indent=2, ensure_ascii=False))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Delegates to the evaluation module (``finetune_trainer.evaluate``)."""
    from .evaluate import command

    return command(args)


def check_fetched_digest(path: str | Path, expected: str) -> str | None:
    """None when the adapter at ``path`` verifies against its manifest and has digest
    ``expected``; otherwise the reason it does not."""
    from finetune_operator.domain.adapter_digest import DigestMismatchError, verify_directory

    try:
        actual = verify_directory(path)
    except (FileNotFoundError, DigestMismatchError) as exc:
        return str(exc)
    if actual != expected:
        return f"adapter digest {actual} differs from the expected {expected}"
    return None


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch a model/adapter/data URI (the fetch module) and, with --digest, verify it."""
    from . import fetch

    if not args.digest:
        return fetch.main(["--uri", args.uri, "--dest", args.dest])
    try:
        path = fetch.fetch(args.uri, Path(args.dest))
    except Exception as exc:
        log.error("fetch: %s", exc)
        return int(getattr(exc, "code", EXIT_DATA))
    problem = check_fetched_digest(path, args.digest)
    if problem:
        log.error("fetch: %s: %s", args.uri, problem)
        return EXIT_DATA
    print(f"fetch: {args.uri} -> {path} (digest verified)")
    return EXIT_OK


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tinymodel import build_tiny_model

    path = build_tiny_model(args.dir, initializer_range=args.initializer_range)
    print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-trainer", description="Fine-tune a LoRA/QLoRA adapter from a job config."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging on stderr.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="Data, training, evaluation, manifest, result.")
    p.add_argument("--config", required=True, help="Trainer config (YAML or JSON).")
    p.add_argument("--no-eval", action="store_true", help="Skip the evaluation step.")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="Training processes on this node (one per GPU); default: the config's "
        "resources.gpus on a CUDA device, else 1.",
    )
    p.add_argument("--nnodes", type=int, help="Nodes taking part (default 1).")
    p.add_argument(
        "--node-rank", type=int, help="This node's index (default: $JOB_COMPLETION_INDEX or 0)."
    )
    p.add_argument("--master-addr", help="Address of node 0 (needed with --nnodes above 1).")
    p.add_argument("--master-port", type=int, help="Rendezvous port on node 0 (default 29500).")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="Evaluate an adapter (or the base model).")
    p.add_argument("--config", required=True, help="Trainer config (YAML or JSON).")
    p.add_argument("--adapter", help="Adapter folder (default: <outputDir>/adapter).")
    p.add_argument("--base-only", action="store_true", help="Evaluate the base model only.")
    p.add_argument("--out", help="Write the metrics JSON here.")
    p.add_argument("--eval-file", help="Eval rows JSONL (default: <outputDir>/eval.jsonl).")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("data-report", help="Run the data step only and print its report.")
    p.add_argument("--config", required=True, help="Trainer config (YAML or JSON).")
    p.set_defaults(func=cmd_data_report)
    p = sub.add_parser("fetch", help="Fetch a URI into a folder (and verify an adapter digest).")
    p.add_argument("--uri", required=True, help="hf://..., s3://... to fetch.")
    p.add_argument("--dest", required=True, help="Local folder to fill.")
    p.add_argument("--digest", help="Expected adapter digest (sha256:...); checked after fetching.")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("make-tiny-model", help="Write a tiny random model for trying things out.")
    p.add_argument("dir", help="Folder to write the model to.")
    p.add_argument(
        "--initializer-range",
        type=float,
        default=0.3,
        help="Std of the random weights (default 0.3: an output head strong enough for a LoRA "
        "adapter to learn the quickstart task in a few dozen CPU steps).",
    )
    p.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup(args.verbose)
    from .distributed import record_outcome

    try:
        code = int(args.func(args))
    except TrainerError as err:
        # Failures before the job's own result handling (e.g. an unreadable config).
        log.error("%s: %s", err.reason, err.message)
        from .progress import emit

        emit({"type": "result", "ok": False, "reason": err.reason, "message": err.message})
        record_outcome(err.exit_code, err.reason, err.message)
        return err.exit_code
    record_outcome(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
