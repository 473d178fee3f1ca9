"""`finetune-operator inspect-server` run as a user runs it: a subprocess on manifest files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict]]:
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "inspect-server", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "operator"), **(env or {})},
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines


def test_examples_are_read_as_vllm_reads_them() -> None:
    rc, lines = run(
        "examples/serving/servers/image-args-with-sidecar.yaml",
        "examples/serving/servers/shell-with-config.yaml",
    )
    assert rc == 0, lines
    image, shell = lines
    assert image["file"].endswith("image-args-with-sidecar.yaml")
    assert (image["vllm"], image["container"], image["form"]) == (True, "vllm", "image entrypoint")
    assert (image["maxLoraRank"], image["maxLoras"], image["maxCpuLoras"]) == (32, 2, 2)
    assert image["loraModules"] == [{"name": "support", "path": "/adapters/support"}]
    assert image["runtimeLoraUpdating"] is True and image["apiKey"] is None
    assert image["port"] == 8000 and image["problems"] == []
    # The ConfigMap in the same file feeds --config; the key stays in its Secret.
    assert shell["form"] == "vllm serve in sh -c" and shell["configFile"] == "/etc/vllm/serve.yaml"
    assert (shell["enableLora"], shell["maxLoraRank"], shell["maxLoras"]) == (True, 64, 4)
    assert shell["maxCpuLoras"] == 8
    assert shell["loraModules"] == [{"name": "sql", "path": "/adapters/sql"}]
    assert shell["apiKey"] == {"from": "secret", "secret": "llama-api", "key": "token"}


def test_problems_give_exit_status_1() -> None:
    rc, lines = run(str(DATA / "broken-server.yaml"), "examples/serving/vllm-deployment.yaml")
    assert rc == 1
    broken, fine = lines
    assert any("not in a ConfigMap volume" in p for p in broken["problems"])
    assert "--max-loras 4 is above --max-cpu-loras 2: vLLM refuses to start" in broken["problems"]
    assert fine["vllm"] and fine["problems"] == []


def test_no_vllm_server_and_unreadable_files(tmp_path: Path) -> None:
    app = tmp_path / "app.yaml"
    app.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n"
        "    spec:\n      containers:\n      - {name: web, image: nginx, args: [--x]}\n"
    )
    rc, lines = run(str(app))
    assert rc == 1 and lines[0]["vllm"] is False and lines[0]["problems"]
    rc, lines = run(str(tmp_path / "missing.yaml"))
    assert rc == 2 and "error" in lines[0]


def test_image_patterns_option_and_setting(tmp_path: Path) -> None:
    own = tmp_path / "own.yaml"
    own.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: own}\nspec:\n  template:\n"
        "    spec:\n      containers:\n      - {name: s, image: 'reg.local/vllm:1', args: [m]}\n"
    )
    assert run(str(own))[1][0]["vllm"] is False
    assert run(str(own), "--image-pattern", "reg.local/vllm:*")[1][0]["vllm"] is True
    env = {"FINETUNE_VLLM_IMAGE_PATTERNS": "reg.local/*"}
    assert run(str(own), env=env)[1][0]["vllm"] is True
