"""Print the VRAM estimator's predictions next to measured peaks, for calibration.

    PYTHONPATH=operator python bench/estimator_reference.py [--json]

Add rows to MEASURED as new measurements come in (GPU, model family, setup, peak GiB);
the coefficients live in finetune_operator.domain.estimator.Coefficients.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from finetune_operator.domain import estimator as est

BASE = est.TrainingSetup(lora_rank=64, micro_batch=4, seq_length=2048, optimizer="paged_adamw_8bit")

# (label, family, setup, measured peak GiB on one H100 80GB): Llama-3-8B points of the padded
# sweep bench/results/h100-2026-11-23/vram.json (bench/fit_estimator.py fits all ten).
MEASURED: list[tuple[str, str, est.TrainingSetup, float]] = [
    ("QLoRA r64 + GC", "llama-3-8b", replace(BASE, method="qlora"), 16.751),
    (
        "LoRA r16 + GC",
        "llama-3-8b",
        replace(BASE, method="lora", lora_rank=16, seq_length=1024),
        18.794,
    ),
    (
        "QLoRA r16, no GC",
        "llama-3-8b",
        replace(
            BASE,
            method="qlora",
            lora_rank=16,
            micro_batch=2,
            seq_length=1024,
            gradient_checkpointing=False,
        ),
        30.11,
    ),
]


def rows() -> list[dict[str, object]]:
    out = []
    for label, family, setup, measured in MEASURED:
        estimate = est.estimate_memory(est.MODEL_FAMILIES[family], setup)
        out.append(
            {
                "case": label,
                "family": family,
                "predictedGiB": estimate.peak_gib,
                "measuredGiB": measured,
                "errorPercent": round(100 * (estimate.peak_gib / measured - 1), 1),
                "breakdown": estimate.breakdown,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    table = rows()
    if args.json:
        print(json.dumps({"coefficients": asdict(est.COEFFICIENTS), "rows": table}, indent=2))
        return
    print(f"{'case':<18}{'family':<12}{'predicted':>10}{'measured':>10}{'error':>8}")
    for row in table:
        print(
            f"{row['case']:<18}{row['family']:<12}{row['predictedGiB']:>10.1f}"
            f"{row['measuredGiB']:>10.1f}{row['errorPercent']:>7.1f}%"
        )
    print("\nbreakdown (GiB):")
    for row in table:
        print(f"  {row['case']}: {row['breakdown']}")


if __name__ == "__main__":
    main()
