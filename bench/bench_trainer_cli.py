"""The project's real trainer CLI on a GPU: tokens/s and peak memory of one short run.

Builds a random-weight model of a real architecture (bench/shapes.py; nothing is
downloaded) with the tiny tokenizer, writes prompt/completion rows with the chat-data length
profile (bench/data.py), writes a trainer config, runs
``python -m finetune_trainer.cli train --config ... --no-eval`` and reads its progress lines
(``@@finetune {...}``). Prints one JSON object per run (packing off, then on).

    python bench/bench_trainer_cli.py --shape llama3-8b --max-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
PREFIX = "@@finetune "


def write_config(
    model_dir: str, data: Path, out: Path, args: argparse.Namespace, packing: bool
) -> Path:
    config = {
        "jobName": f"cli-bench-{'packed' if packing else 'padded'}",
        "spec": {
            "baseModel": {"uri": "file:///models/bench"},
            "dataset": {"train": {"uri": "file:///data/train.jsonl"}, "evalSplit": 0.02},
            "method": args.method,
            "lora": {"r": args.rank, "alpha": 16, "dropout": 0.05},
            "training": {
                "maxSteps": args.max_steps,
                "maxSeqLength": args.seq_len,
                "packing": packing,
                "loggingEverySteps": 1,
                "checkpointEverySteps": 100000,
                "warmupRatio": 0.0,
            },
            "resources": {"gpus": 1},
            "output": {"uri": "file:///out"},
        },
        "paths": {"baseModel": model_dir, "trainData": str(data), "outputDir": str(out)},
        "device": "cuda",
        "progressIntervalSeconds": 0,
        "terminationLog": str(out / "termination-log"),
    }
    path = out.with_suffix(".json")
    path.write_text(json.dumps(config, indent=1))
    return path


def run_cli(config: Path, timeout: int) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "operator"), str(REPO / "trainer-image"), env.get("PYTHONPATH", "")]
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config), "--no-eval"],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    events = [
        json.loads(ln[len(PREFIX) :]) for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)
    ]
    progress = [e for e in events if e.get("type") == "progress"]
    result = next((e for e in reversed(events) if e.get("type") == "result"), None)
    speeds = [p["tokensPerSecond"] for p in progress if p.get("tokensPerSecond")]
    return {
        "exitCode": proc.returncode,
        "wallS": round(wall, 1),
        "steps": progress[-1]["step"] if progress else None,
        "tokensPerSecondLast": speeds[-1] if speeds else None,
        "tokensPerSecondMax": max(speeds) if speeds else None,
        "gpuMemoryGiBMax": max((p.get("gpuMemoryGiB") or 0 for p in progress), default=None),
        "finalLoss": progress[-1].get("loss") if progress else None,
        "result": {k: result.get(k) for k in ("ok", "reason", "message")} if result else None,
        "stderrTail": proc.stderr[-1500:] if proc.returncode else "",
        # what the trainer chose (batch, checkpointing, the fast path's token budget)
        "choices": [
            ln.strip()[-300:]
            for ln in proc.stderr.splitlines()
            if "fast path" in ln or "gradient checkpointing" in ln
        ][:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--modes", default="padded,packed", help="comma list of padded, packed")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "cli-bench")
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("bench-trainer-cli.json"))
    args = parser.parse_args(argv)

    from data import make_text_rows
    from shapes import build_random_model

    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = str(build_random_model(args.shape, args.work_dir / args.shape, device="cuda"))
    data = args.work_dir / "train.jsonl"
    with data.open("w") as fh:
        for row in make_text_rows(args.rows, seed=0):
            fh.write(json.dumps(row) + "\n")
    runs = []
    for mode in [m for m in args.modes.split(",") if m]:
        out = args.work_dir / f"out-{mode}"
        config = write_config(model_dir, data, out, args, packing=mode == "packed")
        res = {
            "mode": mode,
            "shape": args.shape,
            "method": args.method,
            **run_cli(config, args.timeout),
        }
        runs.append(res)
        print(json.dumps(res), flush=True)
        args.out.write_text(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
