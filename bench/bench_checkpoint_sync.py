"""What the s3:// checkpoint upload costs the training loop.

Starts moto's S3 server locally, saves real checkpoints of the tiny model (one short trainer
CLI run, file output) and, for each checkpoint size, measures:

- ``submitSeconds``: the time ``on_save`` spends in ``CheckpointSync.submit`` (the hard-linked
  snapshot and the hand-over to the upload thread): what training waits for;
- ``uploadSeconds``: one synchronous ``upload_checkpoint`` of the same folder (send, verify,
  marker): what training would wait for if the upload ran inside ``on_save``.

Extra sizes pad the checkpoint with a random ``optimizer.pt`` (a larger model's optimizer
state). Prints one JSON object per size. Needs ``moto[server]`` and boto3.

    python bench/bench_checkpoint_sync.py --pad-mib 0 64 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer-image")]


def tiny_checkpoint(tmp: Path) -> Path:
    """Train the tiny model two steps with the real CLI; return its checkpoint folder."""
    from finetune_trainer.tinymodel import build_tiny_model

    model = build_tiny_model(tmp / "model")
    rows = [
        {"prompt": f"Ticket {i}: answer in JSON.", "completion": json.dumps({"n": i})}
        for i in range(16)
    ]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "out"
    config = {
        "jobName": "ckpt-bench",
        "spec": {
            "baseModel": {"uri": "file:///models/tiny"},
            "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "training": {
                "maxSteps": 2,
                "checkpointEverySteps": 2,
                "batchSize": 2,
                "optimizer": "adamw_torch",
                "gradientCheckpointing": False,
                "maxSeqLength": 96,
            },
            "resources": {"gpus": 0},
            "output": {"uri": "file:///out"},
        },
        "paths": {
            "baseModel": str(model),
            "trainData": str(tmp / "train.jsonl"),
            "outputDir": str(out),
        },
        "device": "cpu",
    }
    (tmp / "job.json").write_text(json.dumps(config))
    env = dict(
        os.environ, PYTHONPATH=f"{REPO / 'operator'}:{REPO / 'trainer-image'}", HF_HUB_OFFLINE="1"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.cli",
            "train",
            "--config",
            str(tmp / "job.json"),
            "--no-eval",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    return out / "checkpoints" / "checkpoint-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad-mib", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket="bench")

    from finetune_trainer.remote_checkpoints import CheckpointSync, upload_checkpoint
    from finetune_trainer.s3 import make_client, parse_s3_uri

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        base = tiny_checkpoint(tmp)
        client = make_client()
        for pad in args.pad_mib:
            ckpt = tmp / "sized" / f"checkpoint-{pad + 1}"
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.copytree(base, ckpt)
            if pad:
                (ckpt / "optimizer.pt").write_bytes(os.urandom(pad << 20))
            size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
            uri = f"s3://bench/run-{pad}"
            submit, upload = [], []
            for _ in range(args.repeats):
                sync = CheckpointSync(uri, "sha256:bench", tmp / "staging", None)
                started = time.perf_counter()
                sync.submit(ckpt, pad + 1)
                submit.append(time.perf_counter() - started)
                sync.close()
                started = time.perf_counter()
                upload_checkpoint(client, parse_s3_uri(uri), ckpt, "sha256:bench", pad + 1)
                upload.append(time.perf_counter() - started)
            print(
                json.dumps(
                    {
                        "checkpointBytes": size,
                        "submitSeconds": round(statistics.median(submit), 4),
                        "uploadSeconds": round(statistics.median(upload), 3),
                        "repeats": args.repeats,
                    }
                )
            )
    server.stop()


if __name__ == "__main__":
    main()
