"""Prometheus' own tools for tests: ``promtool`` (and ``prometheus``) from the PATH.

CI installs them (Debian's ``prometheus`` package, see .ci/run) and sets
FINETUNE_REQUIRE_PROMTOOL=1, so there a missing binary fails the test; elsewhere the test is
skipped with a note saying how to install them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_HINT = "apt-get install prometheus (Debian/Ubuntu) puts promtool and prometheus on PATH"


def binary(name: str = "promtool") -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("FINETUNE_REQUIRE_PROMTOOL"):
        pytest.fail(f"{name} is not installed but FINETUNE_REQUIRE_PROMTOOL is set: {INSTALL_HINT}")
    pytest.skip(f"{name} is not installed: {INSTALL_HINT}")


def run(*args: str | Path, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    """Run promtool; fail the test with its whole output unless it exits 0."""
    done = subprocess.run(
        [binary(), *map(str, args)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output
