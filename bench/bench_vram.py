"""VRAM estimator accuracy: measured peak GPU memory against ``finetune_operator.domain.estimator``.

Each configuration runs in its own process (so peaks and the CUDA context are measured clean)
through the trainer's own code: ``finetune_trainer.train.load_model_for_training`` and
``build_sft_config`` with TRL's SFTTrainer, no packing, rows of exactly ``seq`` tokens (the
worst case the estimator predicts). Models are random weights of real architectures built
from their configs (bench/shapes.py); nothing is downloaded.

Measured peak = PyTorch's peak reserved memory + the CUDA context (device memory in use
before the first tensor). The estimator's prediction for the same shape and settings is
compared with it; ``--compare`` redoes the comparison (and ``--propose`` fits coefficients)
from a results file on any machine, no GPU needed.

    python bench/bench_vram.py --out vram.json                 # measure the default matrix
    python bench/bench_vram.py --compare vram.json --propose   # compare and calibrate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO / "operator"))  # the estimator, where finetune_operator is not installed
GIB = 1024**3

# shape, method, LoRA rank, micro-batch, sequence length, gradient checkpointing
DEFAULT_MATRIX: list[dict[str, Any]] = [
    {"shape": "qwen2.5-0.5b", "method": "lora", "rank": 16, "batch": 4, "seq": 1024, "gc": False},
    {"shape": "qwen2.5-0.5b", "method": "qlora", "rank": 16, "batch": 4, "seq": 2048, "gc": True},
    {"shape": "qwen2.5-1.5b", "method": "lora", "rank": 16, "batch": 2, "seq": 2048, "gc": True},
    {"shape": "qwen2.5-1.5b", "method": "qlora", "rank": 16, "batch": 2, "seq": 1024, "gc": False},
    {"shape": "qwen2.5-3b", "method": "qlora", "rank": 16, "batch": 4, "seq": 2048, "gc": True},
    {"shape": "qwen2.5-3b", "method": "lora", "rank": 16, "batch": 1, "seq": 1024, "gc": False},
    {"shape": "llama3-8b", "method": "qlora", "rank": 64, "batch": 4, "seq": 2048, "gc": True},
    {"shape": "llama3-8b", "method": "qlora", "rank": 16, "batch": 2, "seq": 1024, "gc": False},
    {"shape": "llama3-8b", "method": "lora", "rank": 16, "batch": 4, "seq": 1024, "gc": True},
    {"shape": "llama3-8b", "method": "qlora", "rank": 64, "batch": 1, "seq": 4096, "gc": True},
]  # fmt: skip


def config_name(cfg: dict[str, Any]) -> str:
    gc = "gc" if cfg["gc"] else "nogc"
    return f"{cfg['shape']}/{cfg['method']}/r{cfg['rank']}/b{cfg['batch']}x{cfg['seq']}/{gc}"


# ------------------------------------------------------------------------------- measuring


def trainer_config(cfg: dict[str, Any], model_dir: str, out_dir: str) -> Any:
    from finetune_operator.api.trainer_config import TrainerConfig

    spec = {
        "baseModel": {"uri": "file:///models/bench"},
        "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
        "method": cfg["method"],
        "lora": {"r": cfg["rank"], "alpha": 2 * cfg["rank"], "dropout": 0.05},
        "training": {
            "maxSteps": cfg.get("steps", 3),
            "batchSize": cfg["batch"],
            "gradientCheckpointing": cfg["gc"],
            "maxSeqLength": cfg["seq"],
            "optimizer": "paged_adamw_8bit",
            "warmupRatio": 0.0,
            "checkpointEverySteps": 1000,
            "loggingEverySteps": 1,
        },
        "resources": {"gpus": 1},
        "output": {"uri": "file:///out"},
    }
    return TrainerConfig.model_validate(
        {
            "jobName": "vram-bench",
            "spec": spec,
            "paths": {"baseModel": model_dir, "trainData": "/dev/null", "outputDir": out_dir},
            "device": "cuda",
            "terminationLog": None,
        }
    )


def measure_one(cfg: dict[str, Any], models_dir: Path) -> dict[str, Any]:
    """One configuration, in this process: train a few steps, return the peaks."""
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context = total - free
    from datasets import Dataset
    from finetune_trainer.train import build_sft_config, load_model_for_training
    from shapes import build_random_model
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    model_dir = str(build_random_model(cfg["shape"], models_dir / cfg["shape"], device="cuda"))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        config = trainer_config(cfg, model_dir, out)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_model_for_training(config.spec, model_dir, "cuda", cfg["gc"])
        args = build_sft_config(
            config, "cuda", cfg["batch"], cfg["gc"], "paged_adamw_8bit", Path(out) / "ckpt", False
        )
        args.save_strategy = "no"
        rows = cfg["batch"] * (cfg.get("steps", 3) + 1)
        ids = [[1000 + (i * 7 + j) % 4000 for j in range(cfg["seq"])] for i in range(rows)]
        dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    reserved = torch.cuda.max_memory_reserved()
    return {
        **cfg,
        "name": config_name(cfg),
        "peakAllocatedGiB": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peakReservedGiB": round(reserved / GIB, 3),
        "contextGiB": round(context / GIB, 3),
        "measuredGiB": round((reserved + context) / GIB, 3),
        "trainSeconds": round(seconds, 1),
    }


def measure_all(
    matrix: list[dict[str, Any]], models_dir: Path, out: Path, timeout: int
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "operator"), str(REPO / "trainer-image"), env.get("PYTHONPATH", "")]
    )
    for cfg in matrix:
        cmd = [sys.executable, __file__, "--one", json.dumps(cfg), "--models-dir", str(models_dir)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                result = json.loads(lines[-1])
            else:
                tail = (proc.stderr or proc.stdout)[-600:]
                oom = "out of memory" in tail.lower()
                result = {**cfg, "name": config_name(cfg), "error": "OutOfMemory" if oom else tail}
        except subprocess.TimeoutExpired:
            result = {**cfg, "name": config_name(cfg), "error": f"timeout after {timeout}s"}
        results.append(result)
        print(json.dumps(result), flush=True)
        out.write_text(json.dumps({"environment": environment(), "results": results}, indent=1))
    return results


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------------------- comparing


def estimator_module() -> Any:
    from finetune_operator.domain import estimator

    return estimator


def predict(cfg: dict[str, Any], coefficients: Any = None) -> float:
    est = estimator_module()
    from shapes import SHAPES

    shape = est.ModelShape.from_hf_config(SHAPES[cfg["shape"]])
    setup = est.TrainingSetup(
        method=cfg["method"],
        lora_rank=cfg["rank"],
        micro_batch=cfg["batch"],
        seq_length=cfg["seq"],
        gradient_checkpointing=cfg["gc"],
        optimizer="paged_adamw_8bit",
    )
    coeff = coefficients if coefficients is not None else est.COEFFICIENTS
    return float(est.estimate_memory(shape, setup, coeff).peak_gib)


def compare(results: list[dict[str, Any]], coefficients: Any = None) -> dict[str, Any]:
    rows = []
    for r in results:
        if "measuredGiB" not in r:
            continue
        predicted = predict(r, coefficients)
        rows.append(
            {
                "name": r["name"],
                "measuredGiB": r["measuredGiB"],
                "predictedGiB": round(predicted, 2),
                "error": round(predicted / r["measuredGiB"] - 1, 4),
            }
        )
    errors = [abs(r["error"]) for r in rows]
    return {
        "rows": rows,
        "medianAbsError": round(statistics.median(errors), 4) if errors else None,
        "worstAbsError": round(max(errors), 4) if errors else None,
        "underPredicted": sum(1 for r in rows if r["error"] < 0),
    }


def propose(results: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """Grid search over the estimator's main coefficients, minimising the mean and the worst
    error while keeping under-predictions small (an under-prediction is an OOM).

    The three activation coefficients move together (one scale factor): a matrix of few
    shapes cannot tell the hidden-size term from the intermediate-size term apart.
    """
    est = estimator_module()
    current = est.COEFFICIENTS
    act_fields = ("act_per_hidden", "act_per_intermediate", "act_lora_per_input")
    grid: dict[str, list[float]] = {
        "act_scale": [x / 20 for x in range(10, 31)],
        "checkpoint_live_layers": [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0],
        "logits_bytes": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0],
        "fragmentation": [0.0, 0.03, 0.05, 0.08, 0.1, 0.15],
        "cuda_overhead_gib": [0.25, 0.5, 0.75, 1.0],
    }

    def build(values: dict[str, float]) -> Any:
        scale = values.get("act_scale", 1.0)
        changes = {k: getattr(current, k) * scale for k in act_fields}
        changes.update({k: v for k, v in values.items() if k != "act_scale"})
        return dataclasses.replace(current, **changes)

    def score(coeff: Any) -> float:
        cmp = compare(results, coeff)
        errors = [r["error"] for r in cmp["rows"]]
        under = min(errors, default=0.0)
        penalty = 10 * max(0.0, -under - 0.05)  # under-predicting by more than 5% is costly
        mean_abs = sum(abs(e) for e in errors) / max(1, len(errors))
        return mean_abs + 0.5 * (cmp["worstAbsError"] or 0.0) + penalty

    # the whole grid: a few thousand cheap, pure estimates
    import itertools

    names = list(grid)
    chosen: dict[str, float] = {}
    best_score = score(build(chosen))
    for values in itertools.product(*(grid[n] for n in names)):
        trial = dict(zip(names, (float(v) for v in values), strict=True))
        s = score(build(trial))
        if s < best_score - 1e-9:
            chosen, best_score = trial, s
    best = build(chosen)
    changed = {
        k: round(v, 4) for k, v in dataclasses.asdict(best).items() if v != getattr(current, k)
    }
    return best, changed


def print_comparison(title: str, cmp: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(f"{'configuration':55} {'measured':>9} {'estimate':>9} {'error':>7}")
    for r in cmp["rows"]:
        print(
            f"{r['name']:55} {r['measuredGiB']:9.2f} {r['predictedGiB']:9.2f} {100 * r['error']:6.1f}%"
        )
    if cmp["rows"]:
        print(
            f"median |error| {100 * cmp['medianAbsError']:.1f}%, worst {100 * cmp['worstAbsError']:.1f}%, "
            f"under-predicted {cmp['underPredicted']}/{len(cmp['rows'])}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-vram.json"), help="results file to write"
    )
    parser.add_argument(
        "--matrix", type=Path, help="JSON list of configurations (default: the built-in 10)"
    )
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-models"
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument(
        "--compare", type=Path, help="compare an existing results file instead of measuring"
    )
    parser.add_argument(
        "--propose", action="store_true", help="fit estimator coefficients to the results"
    )
    parser.add_argument("--calibration-out", type=Path, default=HERE / "estimator_calibration.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), args.models_dir)))
        return 0
    if args.compare:
        results = json.loads(args.compare.read_text())["results"]
    else:
        matrix = json.loads(args.matrix.read_text()) if args.matrix else DEFAULT_MATRIX
        results = measure_all(matrix, args.models_dir, args.out, args.timeout)
    cmp = compare(results)
    print_comparison("estimator (current coefficients) against measured peak", cmp)
    if args.propose and cmp["rows"]:
        best, changed = propose(results)
        after = compare(results, best)
        print_comparison(f"estimator with proposed coefficients {changed}", after)
        args.calibration_out.write_text(
            json.dumps(
                {
                    "source": str(args.compare or args.out),
                    "measurements": len(after["rows"]),
                    "before": {
                        "medianAbsError": cmp["medianAbsError"],
                        "worstAbsError": cmp["worstAbsError"],
                    },
                    "after": {
                        "medianAbsError": after["medianAbsError"],
                        "worstAbsError": after["worstAbsError"],
                    },
                    "coefficients": changed,
                    "comparison": after["rows"],
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {args.calibration_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
