"""Peak memory and time of the trainer's data step on hostile and on large inputs.

Each measurement runs ``finetune_trainer.data.prepare_data`` (read, detect, clean, template,
tokenize, split) in a fresh process with the tiny model's tokenizer (the one the tests use),
and reports the process's peak RSS (``ru_maxrss``), its RSS once the tokenizer is loaded
(``baseMiB``), and the wall time of the data step alone. Cases:

- ``giant``: 20 ordinary rows plus one row whose prompt is ``--row-mb`` MB of text;
- ``many``: ``--rows`` small distinct prompt/completion rows.

``--code DIR`` runs another checkout's trainer (a folder holding ``operator/`` and
``trainer-image/``), e.g. an older commit unpacked with ``git archive``, for before/after:

    python bench/bench_data.py --case giant --row-mb 50
    python bench/bench_data.py --case many --rows 1000000
    python bench/bench_data.py --case giant --row-mb 5 --code /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def small_row(i: int) -> dict[str, str]:
    return {
        "prompt": f"Ticket {i}: the customer asks about order {i * 7919 % 100003}. Reply briefly.",
        "completion": f"Order {i} is on its way; reference {i:07d}.",
    }


def write_giant(path: Path, row_mb: float) -> None:
    with path.open("wb") as f:
        for i in range(20):
            f.write(json.dumps(small_row(i)).encode() + b"\n")
        f.write(b'{"prompt": "')
        chunk = b"word " * 200_000  # 1 MB
        for _ in range(int(row_mb)):
            f.write(chunk)
        f.write(b'", "completion": "ok"}\n')


def write_many(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps(small_row(i)) + "\n")


def child(args: argparse.Namespace) -> None:
    """Runs in the measured process: load the tokenizer, then time the data step."""
    from finetune_operator.api.finetunejob import DatasetSpec
    from finetune_trainer.data import load_tokenizer, prepare_data

    tokenizer, _ = load_tokenizer(args.model)
    dataset = DatasetSpec.model_validate({"train": {"uri": "file:///d"}})
    base = rss_mib()
    started = time.perf_counter()
    prepared = prepare_data(dataset, args.data, None, tokenizer, args.max_seq_length, 7)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = prepared.report
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "peakMiB": round(peak),
                "baseMiB": round(base),
                "rowsRead": report.rows_read,
                "rowsKept": report.rows_kept,
                "dropped": report.dropped,
            }
        )
    )


def measure(code: Path, data: Path, model: Path, max_seq_length: int, limit_s: int) -> Any:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code / "operator"), str(code / "trainer-image")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--model", str(model)]
    cmd += ["--max-seq-length", str(max_seq_length)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {limit_s} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=["giant", "many"], default="giant")
    parser.add_argument("--row-mb", type=float, default=50.0)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--code", type=Path, default=REPO, help="checkout to measure")
    parser.add_argument("--limit-s", type=int, default=1800, help="give up after this long")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer-image")]
    from finetune_trainer.tinymodel import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        data = Path(tmp) / "train.jsonl"
        if args.case == "giant":
            write_giant(data, args.row_mb)
        else:
            write_many(data, args.rows)
        result = measure(args.code, data, model, args.max_seq_length, args.limit_s)
    size = f"{args.row_mb:g} MB row" if args.case == "giant" else f"{args.rows} rows"
    print(json.dumps({"case": args.case, "size": size, "code": str(args.code), **result}))


if __name__ == "__main__":
    main()
