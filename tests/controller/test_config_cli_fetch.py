"""Operator configuration, the CLI and the trainer's fetch step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_operator.cli import main as cli_main
from finetune_operator.config import ConfigError, OperatorConfig, describe, load_config
from finetune_operator.domain.uris import StorageUri
from finetune_trainer import fetch

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_environment() -> None:
    assert load_config({}) == OperatorConfig()


def test_environment_overrides_are_typed() -> None:
    config = load_config(
        {
            "FINETUNE_TRAINER_IMAGE": "reg/trainer:2",
            "FINETUNE_WATCH_NAMESPACES": "team-a, team-b,",
            "FINETUNE_GPU_MEMORY_OVERRIDES": '{"NVIDIA-B200": 179}',
            "FINETUNE_PROGRESS_POLL_SECONDS": "2.5",
            "FINETUNE_PROGRESS_POLLS_PER_SECOND": "50",
            "FINETUNE_UNOBSERVED_RECONCILE_SECONDS": "90",
            "FINETUNE_METRICS_PORT": "9090",
            "FINETUNE_JOB_TTL_SECONDS": "600",
        }
    )
    assert config.trainer_image == "reg/trainer:2"
    assert config.watch_namespaces == ("team-a", "team-b")
    assert config.gpu_memory_overrides == {"NVIDIA-B200": 179.0}
    assert config.progress_poll_seconds == 2.5
    assert config.progress_polls_per_second == 50.0
    assert config.unobserved_reconcile_seconds == 90.0
    assert config.metrics_port == 9090
    assert config.job_ttl_seconds == 600


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FINETUNE_METRICS_PORT": "eighty"}, "FINETUNE_METRICS_PORT"),
        ({"FINETUNE_GPU_MEMORY_OVERRIDES": "[1]"}, "FINETUNE_GPU_MEMORY_OVERRIDES"),
        ({"FINETUNE_MEMORY_HEADROOM": "0.95"}, "FINETUNE_MEMORY_HEADROOM"),
        ({"FINETUNE_PROGRESS_POLL_SECONDS": "0"}, "FINETUNE_PROGRESS_POLL_SECONDS"),
        ({"FINETUNE_PROGRESS_POLLS_PER_SECOND": "0"}, "FINETUNE_PROGRESS_POLLS_PER_SECOND"),
        ({"FINETUNE_UNOBSERVED_RECONCILE_SECONDS": "-1"}, "FINETUNE_UNOBSERVED_RECONCILE_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env)


def test_every_setting_has_help_and_a_variable() -> None:
    from dataclasses import fields

    from finetune_operator.policy import Policy

    items = describe()
    # Every setting but the policy group, plus each policy setting.
    assert len(items) == len(OperatorConfig.__dataclass_fields__) - 1 + len(fields(Policy))
    assert all(i["help"] and i["env"].startswith("FINETUNE_") for i in items)
    assert len({i["env"] for i in items}) == len(items)


def test_cli_lists_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config"]) == 0
    out = capsys.readouterr().out
    assert "FINETUNE_TRAINER_IMAGE" in out
    for var in ("FINETUNE_POLICY_ALLOWED_IMAGES", "FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE"):
        assert var in out
    assert "operator.policy.trainer.defaultMemory" in out  # names the chart value
    patterns = "FINETUNE_VLLM_IMAGE_PATTERNS  (default: 'vllm/vllm-openai*,docker.io/vllm/"
    assert patterns in out and "operator.serving.vllmImagePatterns" in out


def test_cli_run_rejects_bad_configuration(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_METRICS_PORT", "x")
    assert cli_main(["run", "--namespace", "default"]) == 2
    assert "FINETUNE_METRICS_PORT" in capsys.readouterr().err


def test_cli_module_help_runs_as_a_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer-image'}"}
    out = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "run", "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        "--all-namespaces" in out.stdout
        and "--liveness" in out.stdout
        and "--peering" in out.stdout
    )


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "hf://meta-llama/Meta-Llama-3-8B@main",
            StorageUri("hf", "meta-llama/Meta-Llama-3-8B", "", revision="main"),
        ),
        (
            "hf://datasets/acme/support@v2/data/train.jsonl",
            StorageUri("hf", "acme/support", "data/train.jsonl", revision="v2", dataset=True),
        ),
        ("hf://datasets/acme/support", StorageUri("hf", "acme/support", dataset=True)),
        (
            "s3://corp-data/support/train.jsonl",
            StorageUri("s3", "corp-data", "support/train.jsonl"),
        ),
    ],
)
def test_fetch_parses_sources(uri: str, expected: object) -> None:
    assert fetch.parse_uri(uri) == expected


@pytest.mark.parametrize("uri", ["pvc://claim/x", "hf://org/../etc", "ftp://host/file"])
def test_fetch_rejects_other_sources(
    uri: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert fetch.main(["--uri", uri, "--dest", str(tmp_path)]) == fetch.EXIT_USAGE
    assert "fetch:" in capsys.readouterr().err


def test_fetch_hf_offline_fails_cleanly_without_leaking_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_super_secret_token_value")
    code = fetch.main(["--uri", "hf://acme/no-such-model@main", "--dest", str(tmp_path / "m")])
    captured = capsys.readouterr()
    assert code != 0
    assert "hf_super_secret_token_value" not in captured.out + captured.err


def test_an_optional_fetch_writes_its_failure_down_and_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluation.compareWith's fetch step: a missing adapter must not fail the trainer pod."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_super_secret_token_value")
    error = tmp_path / "compare-fetch-error.txt"
    args = ["--uri", "hf://acme/champion@v1", "--dest", str(tmp_path / "compare"),
            "--digest", "sha256:" + "c" * 64, "--error-file", str(error)]  # fmt: skip
    assert fetch.main(args) == fetch.EXIT_OK
    text = error.read_text()
    assert text.startswith("fetch of hf://acme/champion@v1 failed: ")
    assert "hf_super_secret_token_value" not in text
    assert fetch.main(args[:-2]) != fetch.EXIT_OK  # without --error-file it still fails
