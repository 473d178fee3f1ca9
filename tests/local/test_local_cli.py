"""`finetune-local` (`python -m finetune_local`): the demo and local runs live in their own package,
apart from the operator's `finetune-operator` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_local.localrun import EXIT_USAGE
from finetune_operator.cli import main as operator_main

ROOT = Path(__file__).resolve().parents[2]


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'trainer-image'}"}
    return subprocess.run(
        [sys.executable, "-m", "finetune_local", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_help_lists_the_demo_and_local_runs() -> None:
    done = run_module("--help")
    assert done.returncode == 0
    assert "demo" in done.stdout
    assert "run" in done.stdout


def test_local_run_of_a_missing_manifest_says_which_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    done = run_module("run", str(missing))
    assert done.returncode == EXIT_USAGE
    assert f"finetune-local run: {missing}: cannot read the manifest" in done.stderr


@pytest.mark.parametrize("command", ["demo", "local"])
def test_operator_command_has_no_local_subcommands(command: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        operator_main([command])
    assert exit_info.value.code == 2
