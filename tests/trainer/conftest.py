"""Fixtures of the trainer tests: the S3 server of the s3:// output tests (support.s3_server).

The tiny model (`tiny_model`) comes from support.trainer_fixtures, for every test folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.s3_server import NO_AMBIENT_AWS, S3Server, s3_server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """One S3 server per test module (the modules' users and objects do not meet)."""
    with s3_server() as server:
        yield server


@pytest.fixture()
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's environment as the trainer pod's (for in-process fetch/upload calls)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**NO_AMBIENT_AWS, **s3.env()}.items():
        monkeypatch.setenv(name, value)
    return s3
