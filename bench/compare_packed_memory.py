"""Compare the packed memory model with measured fast-path peaks.

Reads result files of ``bench/bench_train.py`` (one or more; every fast-path variant in them)
and prints, per run, the measured peak (PyTorch's peak reserved memory plus the CUDA context
the model counts as ``overhead_bytes``), the peak ``finetune_operator.domain.packed_memory``
predicts for the same shape, tokens, checkpointing, offload and dropout, and the error. The
memory-model tests hold the same points (``tests/perf/test_fastpath.py``).

    PYTHONPATH=operator:trainer-image python bench/compare_packed_memory.py \\
        bench/results/h100-2026-12-07/memory-*.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3


def shape_name(data: dict[str, Any]) -> str:
    """The shape's name; runs on a --model-dir recorded its path there (and the name in settings)."""
    shape = str(data["model"].get("shapeName") or data["model"]["shape"])
    return shape if not shape.startswith("/") else str(data["settings"]["shape"])


def measured_points(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per successful fast-path variant: shape, settings and measured peak."""
    points = []
    for path in paths:
        data = json.loads(path.read_text())
        model = data["model"]
        for result in data["results"]:
            if "error" in result or "fastpath" not in result or "peakReservedGiB" not in result:
                continue
            config = result["config"]
            points.append(
                {
                    "file": path.name,
                    "variant": result["variant"],
                    "shape": shape_name(data),
                    "method": model["method"],
                    "rank": model["rank"],
                    "tokens": config["max_length"],
                    "gc": bool(config["gradient_checkpointing"]),
                    "dropout": float(config.get("lora_dropout", 0.05)),
                    "offload": bool(result["fastpath"].get("activation_offload")),
                    # PEFT's dropout keeps copies of its inputs; the fast path's does not
                    "dropoutSavesInputs": bool(
                        (result["fastpath"].get("lora_dropout") or {}).get("savesInputs", True)
                    ),
                    "reservedGiB": result["peakReservedGiB"],
                    "allocatedGiB": result.get("peakAllocatedGiB"),
                    "beforeTrainGiB": result.get("allocatedBeforeTrainGiB"),
                }
            )
    return points


@functools.cache
def model_shape(name: str) -> Any:
    from finetune_operator.domain.estimator import ModelShape
    from shapes import make_config

    return ModelShape.from_config(make_config(name))


def predicted_gib(point: dict[str, Any], coef: Any = None) -> tuple[float, dict[str, float]]:
    from finetune_operator.domain.packed_memory import peak_breakdown_bytes

    parts = peak_breakdown_bytes(
        model_shape(point["shape"]),
        coef=coef,
        method=point["method"],
        lora_rank=point["rank"],
        tokens=point["tokens"],
        gradient_checkpointing=point["gc"],
        lora_dropout=point["dropout"],
        activation_offload=point["offload"],
        dropout_saves_inputs=point["dropoutSavesInputs"],
    )
    return sum(parts.values()) / GIB, {k: round(v / GIB, 2) for k, v in parts.items()}


# The coefficients a fit may move; fragmentation stays 1. ``overhead_bytes`` is the CUDA
# context plus whatever fixed cost the analytic parts (weights, adapter, optimiser) miss.
FITTED = (
    "act_per_hidden",
    "act_per_intermediate",
    "dropout_bytes_per_input",
    "recompute_layer_factor",
)
# overhead_bytes (the CUDA context, outside reserved memory) is not fitted: left free, the
# search shrinks it to almost nothing to trade against the activation terms.


def fit_error(error: float, under_weight: float) -> float:
    """How bad one prediction error is: running out of memory is worse than wasting some."""
    return -under_weight * error if error < 0 else error


def fit_coefficients(
    points: list[dict[str, Any]], context_gib: float, under_weight: float = 3.0
) -> tuple[Any, float]:
    """Coordinate search (multiplicative steps, halved when no step helps) for the coefficients
    whose worst weighted error over ``points`` is smallest. Returns them and that error."""
    from dataclasses import replace

    from finetune_operator.domain.packed_memory import MemoryCoefficients

    measured = [p["reservedGiB"] + context_gib for p in points]

    def worst(coef: Any) -> float:
        return max(
            fit_error(predicted_gib(p, coef)[0] / m - 1, under_weight)
            for p, m in zip(points, measured, strict=True)
        )

    coef = MemoryCoefficients()
    best = worst(coef)
    step = 0.2
    while step > 0.002:
        improved = False
        for name in FITTED:
            for factor in (1 + step, 1 / (1 + step)):
                candidate = replace(coef, **{name: getattr(coef, name) * factor})
                error = worst(candidate)
                if error < best - 1e-6:
                    coef, best, improved = candidate, error, True
        if not improved:
            step /= 2
    return coef, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument(
        "--context-gib", type=float, default=0.5, help="CUDA context outside reserved memory"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per run")
    parser.add_argument(
        "--fit",
        action="store_true",
        help="fit the activation coefficients to these runs (worst error, under-prediction "
        "weighted 3x) and compare with the fitted ones",
    )
    parser.add_argument(
        "--write", type=Path, help="with --fit: write all fitted coefficients to this JSON file"
    )
    args = parser.parse_args(argv)
    points = measured_points(args.results)
    coef = None
    if args.fit and points:
        coef, worst = fit_coefficients(points, args.context_gib)
        fitted = {name: round(getattr(coef, name), 4) for name in FITTED}
        print(f"fitted (worst weighted error {100 * worst:.1f}%): {json.dumps(fitted)}\n")
        if args.write:
            args.write.parent.mkdir(parents=True, exist_ok=True)
            args.write.write_text(json.dumps(dataclasses.asdict(coef), indent=1))
    rows = []
    for point in points:
        predicted, parts = predicted_gib(point, coef)
        measured = point["reservedGiB"] + args.context_gib
        point.update(
            predictedGiB=round(predicted, 2),
            measuredGiB=round(measured, 2),
            error=round(predicted / measured - 1, 4),
            parts=parts,
        )
        rows.append(point)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print("| shape | tokens | ckpt | offload | dropout | measured GiB | predicted GiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['tokens']:,} | {'on' if r['gc'] else 'off'} | "
            f"{'on' if r['offload'] else 'off'} | {r['dropout']} | {r['measuredGiB']:.2f} | "
            f"{r['predictedGiB']:.2f} | {100 * r['error']:+.1f}% |"
        )
    if rows:
        worst = max(rows, key=lambda r: abs(r["error"]))
        print(f"\nworst: {worst['variant']} ({worst['shape']}) {100 * worst['error']:+.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
