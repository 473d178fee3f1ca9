"""A real S3-compatible server for the s3:// output tests and helpers around it.

moto's server, on a free local port, with IAM authentication enforced; the trainer tests'
conftest.py serves it as the `s3` and `aws_env` fixtures.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.api.trainer_config import PROGRESS_PREFIX

from support.trainer_samples import (
    REPO,
    json_task_rows,
    make_config,
    subprocess_env,
    write_config,
    write_jsonl,
)

BUCKET = "models"
REGION = "us-east-1"
ALLOW_S3 = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
)

DENY_CHECKPOINT_WRITES = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {
                "Effect": "Deny",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{BUCKET}/*/checkpoints/*",
            },
        ],
    }
)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    denied_key_id: str  # a valid user without any S3 permission
    denied_secret: str
    no_checkpoints_key_id: str  # may do anything but write under */checkpoints/
    no_checkpoints_secret: str

    def env(self, **overrides: str) -> dict[str, str]:
        """Variables as a Secret's envFrom gives them to the trainer."""
        values = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": REGION,
        }
        values.update(overrides)
        return values

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name=REGION,
        )


def isolated_env(extra: dict[str, str]) -> dict[str, str]:
    """A subprocess environment with no AWS settings but ``extra`` (no ~/.aws, no IMDS)."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(NO_AMBIENT_AWS)
    env.update(extra)
    return env


NO_AMBIENT_AWS = {
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance metadata service
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """A started server with a bucket and three users; emptied and stopped on exit."""
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _host, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {
        "endpoint_url": endpoint,
        "aws_access_key_id": "bootstrap",
        "aws_secret_access_key": "bootstrap",
        "region_name": REGION,
    }
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="writer")
    writer = iam.create_access_key(UserName="writer")["AccessKey"]
    iam.put_user_policy(UserName="writer", PolicyName="s3", PolicyDocument=ALLOW_S3)
    iam.create_user(UserName="nobody")
    nobody = iam.create_access_key(UserName="nobody")["AccessKey"]
    iam.create_user(UserName="no-checkpoints")
    no_checkpoints = iam.create_access_key(UserName="no-checkpoints")["AccessKey"]
    iam.put_user_policy(
        UserName="no-checkpoints", PolicyName="s3", PolicyDocument=DENY_CHECKPOINT_WRITES
    )
    boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
    # From here on every request must be signed by a known key with a permitting policy.
    previous = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield S3Server(
            endpoint,
            writer["AccessKeyId"],
            writer["SecretAccessKey"],
            nobody["AccessKeyId"],
            nobody["SecretAccessKey"],
            no_checkpoints["AccessKeyId"],
            no_checkpoints["SecretAccessKey"],
        )
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = previous
        # moto keeps its accounts in this process: empty them for the next module's server.
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30
        ).close()
        server.stop()


def object_sizes(s3: S3Server, prefix: str) -> dict[str, int]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def cli_result(stdout: str) -> dict[str, Any]:
    lines = [x for x in stdout.splitlines() if x.startswith(PROGRESS_PREFIX)]
    result = json.loads(lines[-1][len(PROGRESS_PREFIX) :])
    assert result["type"] == "result"
    return result


def train_cli(
    tmp: Path,
    model: Path,
    uri: str,
    env: dict[str, str],
    name: str,
    *flags: str,
    training: dict[str, Any] | None = None,
) -> Any:
    train = write_jsonl(tmp / "train.jsonl", json_task_rows(16))
    out = tmp / name
    cfg = make_config(
        model,
        train,
        out,
        training=training or {"maxSteps": 3, "checkpointEverySteps": 3},
        output={"uri": uri, "credentialsSecretRef": {"name": "s3-out"}},
    )
    path = write_config(tmp / f"{name}.json", cfg)
    command = [sys.executable, "-m", "finetune_trainer.cli", *flags, "train"]
    proc = subprocess.run(
        [*command, "--config", str(path), "--no-eval"],
        cwd=REPO,
        env=isolated_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out, path


def assert_no_secret(s3: S3Server, *texts: str) -> None:
    for text in texts:
        for value in (
            s3.secret,
            s3.key_id,
            s3.denied_secret,
            s3.denied_key_id,
            s3.no_checkpoints_key_id,
            s3.no_checkpoints_secret,
            "WRONG-SECRET",
        ):
            assert value not in text
