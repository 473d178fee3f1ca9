"""Fit the VRAM estimator's coefficients to measured H100 peaks (no GPU needed).

Loads the padded-batch sweep measured by ``bench/bench_vram.py`` (peak reserved + CUDA
context), compares it with ``finetune_operator.domain.estimator`` exactly as ``bench_vram.py
--compare`` does, and fits the tunable numbers of :class:`Coefficients` with a bounded
coordinate search on the log-ratio (estimate / measured). The physical model is kept; only
coefficients move. Under-prediction costs three times as much as over-prediction (an
under-prediction is an OOM, an over-prediction a smaller batch).

A few configurations are held out of the fit and reported separately, so the error on
points the fit never saw is visible. Other measurements (the earlier padded run with
completion-only loss, the packed fast-path runs) are printed for reference only: they ran a
different loss/attention path than the one the estimator models.

    PYTHONPATH=operator python bench/fit_estimator.py            # fit and print
    PYTHONPATH=operator python bench/fit_estimator.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_vram import compare, estimator_module, print_comparison  # noqa: E402

SWEEP = HERE / "results" / "h100-2026-11-23" / "vram.json"
REFERENCE_ONLY = HERE / "results" / "h100-vram-from-train-2026-11-23.json"

# Held out of the fit: one LoRA+GC point, one QLoRA without GC, one long-sequence QLoRA+GC
# on the largest shape. Each kind still has other members in the fit set.
HOLDOUT = (
    "qwen2.5-1.5b/lora/r16/b2x2048/gc",
    "llama3-8b/qlora/r16/b2x1024/nogc",
    "llama3-8b/qlora/r64/b1x4096/gc",
)

# Bounds of each tuned coefficient (physically plausible ranges, not free numbers).
ACT_FIELDS = ("act_per_hidden", "act_per_intermediate", "act_lora_per_input")
BOUNDS: dict[str, tuple[float, float]] = {
    "act_scale": (0.5, 3.0),  # multiplies the three activation coefficients together
    "checkpoint_bytes_per_hidden": (2.0, 8.0),  # the saved bf16 layer input and a bit more
    "checkpoint_live_layers": (0.2, 3.0),
    "logits_bytes": (1.0, 12.0),  # bf16 logits + fp32 upcast + softmax/grad copies
    "cuda_overhead_gib": (0.5, 2.0),  # measured context alone is 0.51-0.62 GiB
    "fragmentation": (0.0, 0.15),
    "qlora_activation_scale": (1.0, 2.0),  # float32 residual stream after k-bit preparation
}
UNDER_WEIGHT = 3.0


def load(path: Path) -> list[dict[str, Any]]:
    return [r for r in json.loads(path.read_text())["results"] if "measuredGiB" in r]


def build(base: Any, values: dict[str, float]) -> Any:
    scale = values.get("act_scale", 1.0)
    changes: dict[str, float] = {k: getattr(base, k) * scale for k in ACT_FIELDS}
    changes.update({k: v for k, v in values.items() if k != "act_scale"})
    return dataclasses.replace(base, **changes)


def loss(results: list[dict[str, Any]], coeff: Any) -> float:
    """Mean asymmetric |log ratio| plus half the worst one."""
    terms = []
    for row in compare(results, coeff)["rows"]:
        r = math.log(max(row["predictedGiB"], 1e-6) / row["measuredGiB"])
        terms.append(UNDER_WEIGHT * -r if r < 0 else r)
    return sum(terms) / len(terms) + 0.5 * max(terms)


def fit(results: list[dict[str, Any]], base: Any, rounds: int = 6, steps: int = 41) -> Any:
    """Bounded coordinate search: each coefficient in turn over a grid, narrowing each round."""
    values = {"act_scale": 1.0}
    values.update({k: getattr(base, k) for k in BOUNDS if k != "act_scale"})
    for k, (lo, hi) in BOUNDS.items():
        values[k] = min(hi, max(lo, values[k]))
    width = {k: hi - lo for k, (lo, hi) in BOUNDS.items()}
    for _ in range(rounds):
        for _sweep in range(3):
            for name, (lo, hi) in BOUNDS.items():
                centre = values[name]
                a, b = max(lo, centre - width[name] / 2), min(hi, centre + width[name] / 2)
                grid = [a + (b - a) * i / (steps - 1) for i in range(steps)]
                scored = [(loss(results, build(base, {**values, name: g})), g) for g in grid]
                values[name] = min(scored)[1]
        width = {k: w / 3 for k, w in width.items()}
    return build(base, values)


def rounded(coeff: Any, base: Any) -> Any:
    """Coefficients rounded to publishable precision (rounded up where it matters for safety)."""
    changes: dict[str, float] = {}
    for field in dataclasses.fields(coeff):
        value = getattr(coeff, field.name)
        if value == getattr(base, field.name) or field.name.startswith("quant_const"):
            continue
        changes[field.name] = math.ceil(value * 100) / 100
    return dataclasses.replace(coeff, **changes)


def summary(cmp: dict[str, Any]) -> dict[str, Any]:
    errors = [r["error"] for r in cmp["rows"]]
    return {
        "medianAbsError": round(statistics.median(abs(e) for e in errors), 4),
        "worstAbsError": round(max(abs(e) for e in errors), 4),
        "worstUnder": round(min(errors), 4),
        "underPredicted": sum(1 for e in errors if e < 0),
        "n": len(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=SWEEP)
    parser.add_argument("--json", type=Path, help="write before/after comparison here")
    args = parser.parse_args(argv)

    est = estimator_module()
    results = load(args.sweep)
    fit_set = [r for r in results if r["name"] not in HOLDOUT]
    held = [r for r in results if r["name"] in HOLDOUT]

    # "Before" is the coefficient set this calibration replaced.
    before = PREVIOUS
    # Not fitted: prepare_model_for_kbit_training casts the unquantised weights to float32.
    start = dataclasses.replace(before, qlora_other_param_bytes=4.0)
    fitted = rounded(fit(fit_set, start), start)
    current = est.COEFFICIENTS

    report: dict[str, Any] = {"source": str(args.sweep), "holdout": list(HOLDOUT)}
    for label, coeff in (("before", before), ("fitted", fitted), ("defaults", current)):
        cmp_all = compare(results, coeff)
        print_comparison(f"{label}: all {len(results)} configurations", cmp_all)
        report[label] = {
            "all": summary(cmp_all),
            "fitSet": summary(compare(fit_set, coeff)),
            "holdout": summary(compare(held, coeff)),
            "rows": cmp_all["rows"],
        }
        print(f"  fit set: {report[label]['fitSet']}\n  held out: {report[label]['holdout']}")
    changed = {
        f.name: getattr(fitted, f.name)
        for f in dataclasses.fields(fitted)
        if getattr(fitted, f.name) != getattr(before, f.name)
    }
    report["fittedCoefficients"] = changed
    print(f"\nfitted coefficients (changed from before): {changed}")
    if dataclasses.asdict(current) != dataclasses.asdict(fitted):
        print("NOTE: estimator defaults differ from this fit")

    if REFERENCE_ONLY.exists():
        print_comparison(
            "reference only (earlier run: completion-only loss / packed fast path; context "
            "assumed 0.5 GiB) with the current defaults",
            compare(load(REFERENCE_ONLY), current),
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _previous() -> Any:
    est = estimator_module()
    return est.Coefficients(
        act_per_hidden=20.0,
        act_per_intermediate=9.0,
        act_lora_per_input=1.0,
        checkpoint_bytes_per_hidden=2.0,
        checkpoint_live_layers=0.2,
        logits_bytes=1.0,
        cuda_overhead_gib=0.5,
        fragmentation=0.03,
        qlora_other_param_bytes=2.0,
        qlora_activation_scale=1.0,
    )


PREVIOUS = _previous()

if __name__ == "__main__":
    raise SystemExit(main())
