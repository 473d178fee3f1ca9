"""evaluation.compareWith: a second adapter evaluated on the same eval rows as the trained one,
with a real (tiny, random) model on CPU; a compared adapter that cannot be used is reported,
never fatal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from evalkit import ticket_eval_rows, train_adapter_steps, write_jsonl
from finetune_operator.api.trainer_config import TrainerConfig
from finetune_trainer.evaluate import run_evaluation
from finetune_trainer.manifest import build_manifest, write_manifest

FAST = {"maxSamples": 6, "maxNewTokens": 4, "latencyRequests": 0}


def lora_model(base_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )


@pytest.fixture(scope="module")
def champion_dir(tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path_factory: Any) -> Path:
    """An adapter trained a few steps on the ticket task, saved with its manifest."""
    from evalkit import make_config

    model = lora_model(tiny_model_dir)
    train_adapter_steps(model, tiny_tokenizer, ticket_eval_rows(tiny_tokenizer, 0, 16), 8, 5e-3)
    folder = tmp_path_factory.mktemp("champion") / "adapter"
    model.save_pretrained(folder)
    spec = make_config(tiny_model_dir, folder.parent).spec
    write_manifest(folder, build_manifest(folder, spec, "sha256:data", {}, {}))
    return folder


def digest_of(folder: Path) -> str:
    return str(json.loads((folder / "manifest.json").read_text())["digest"])


def compare_config(
    config_factory: Callable[..., TrainerConfig], folder: Path, digest: str, **paths: Any
) -> TrainerConfig:
    config = config_factory(
        evaluation={**FAST, "compareWith": {"uri": f"file://{folder}", "digest": digest}}
    )
    update = {"compared_adapter": str(folder), **paths}
    return config.model_copy(update={"paths": config.paths.model_copy(update=update)})


@pytest.mark.slow
def test_the_compared_adapter_is_evaluated_on_the_same_rows_beside_the_trained_one(
    config_factory: Callable[..., TrainerConfig],
    tiny_model_dir: Path,
    tiny_tokenizer: Any,
    champion_dir: Path,
) -> None:
    config = compare_config(config_factory, champion_dir, digest_of(champion_dir))
    out = Path(config.paths.output_dir)
    write_jsonl(out / "eval.jsonl", ticket_eval_rows(tiny_tokenizer, 100, 8))
    # The challenger: a fresh adapter (B = 0), so it scores what the base model scores.
    challenger = lora_model(tiny_model_dir)
    result = run_evaluation(config, model=challenger, tokenizer=tiny_tokenizer)

    compared, mine = result["comparedMetrics"], result["metrics"]
    assert compared is not None and mine is not None and result["comparedError"] is None
    assert set(compared) == set(mine)  # the same metrics, measured on the same rows
    assert compared["evalLoss"] < mine["evalLoss"] - 0.05  # the trained champion is better
    assert json.loads((out / "compared_metrics.json").read_text()) == compared

    # The champion's numbers are its own: evaluated alone from disk on the same rows.
    alone = run_evaluation(config, adapter_dir=champion_dir, out=out / "alone.json")
    assert alone["metrics"] is not None
    assert compared["evalLoss"] == pytest.approx(alone["metrics"]["evalLoss"], rel=1e-4)
    # The trained adapter is active again and the compared one is gone.
    assert list(challenger.peft_config) == ["default"]
    again = run_evaluation(config.model_copy(update={"spec": config.spec.model_copy(
        update={"evaluation": config.spec.evaluation.model_copy(update={"compare_with": None})})}),
        model=challenger, tokenizer=tiny_tokenizer)  # fmt: skip
    assert again["metrics"] is not None
    assert again["metrics"]["evalLoss"] == pytest.approx(mine["evalLoss"], rel=1e-6)


def copy_adapter(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize(
    "spoil, expected",
    [
        ("tamper", "does not match its manifest"),
        ("pickle", "no adapter_model.safetensors"),
        ("wrong-digest", "not the expected"),
        ("fetch-failed", "fetch of s3://bucket/champion failed: no objects found"),
        ("not-lora", "not a LoRA adapter config"),
    ],
)
def test_a_compared_adapter_that_cannot_be_used_is_reported_and_the_run_goes_on(
    config_factory: Callable[..., TrainerConfig],
    tiny_model_dir: Path,
    tiny_tokenizer: Any,
    champion_dir: Path,
    tmp_path: Path,
    spoil: str,
    expected: str,
) -> None:
    folder = copy_adapter(champion_dir, tmp_path / "hostile")
    digest = digest_of(folder)
    paths: dict[str, Any] = {}
    if spoil == "tamper":
        (folder / "adapter_model.safetensors").write_bytes(b"not the trained weights")
    elif spoil == "pickle":
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    elif spoil == "wrong-digest":
        digest = "sha256:" + "0" * 64
    elif spoil == "fetch-failed":
        error = tmp_path / "compare-fetch-error.txt"
        error.write_text("fetch of s3://bucket/champion failed: no objects found")
        paths["compared_fetch_error"] = str(error)
    elif spoil == "not-lora":
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    config = compare_config(config_factory, folder, digest, **paths)
    write_jsonl(Path(config.paths.output_dir) / "eval.jsonl",
                ticket_eval_rows(tiny_tokenizer, 100, 2))  # fmt: skip
    challenger = lora_model(tiny_model_dir)
    result = run_evaluation(config, model=challenger, tokenizer=tiny_tokenizer)
    assert result["metrics"] is not None  # the trained adapter's own evaluation stands
    assert result["comparedMetrics"] is None
    assert result["comparedError"] is not None and expected in result["comparedError"]
    assert any(n.startswith("compareWith not evaluated") for n in result["notes"])
    assert list(challenger.peft_config) == ["default"]


def record_generate_calls(model: Any) -> list[tuple[str, str, int, int]]:
    """Wrap the peft model's ``generate``: each call as (model evaluated, timed or untimed,
    batch rows, new-token budget). Timed requests run with the garbage collector paused, which
    is how a call tells its section here (no clock is read)."""
    import gc

    calls: list[tuple[str, str, int, int]] = []
    inner = model.generate

    def generate(**kwargs: Any) -> Any:
        which = "base" if model._adapters_disabled else str(model.active_adapter)
        section = "untimed" if gc.isenabled() else "timed"
        budget = int(kwargs["generation_config"].max_new_tokens)
        calls.append((which, section, int(kwargs["input_ids"].shape[0]), budget))
        return inner(**kwargs)

    model.generate = generate
    return calls


@pytest.mark.slow
def test_every_evaluated_model_is_timed_after_its_own_warm_up_in_the_same_order(
    config_factory: Callable[..., TrainerConfig],
    tiny_tokenizer: Any,
    tiny_model_dir: Path,
    champion_dir: Path,
) -> None:
    """The trained adapter, the base and the compared adapter each get the same untimed
    warm-up right before their own timed requests: no model's timed section pays a one-time
    cost that another's did not, whichever is evaluated first."""
    import gc

    assert gc.isenabled()
    config = config_factory(
        gates=[{"metric": "evalLoss", "minImprovementOverBase": 0.0}],
        evaluation={**FAST, "latencyRequests": 2, "maxNewTokens": 5, "batchSize": 4,
                    "compareWith": {"uri": f"file://{champion_dir}",
                                    "digest": digest_of(champion_dir)}},
    )  # fmt: skip
    config = config.model_copy(update={"paths": config.paths.model_copy(
        update={"compared_adapter": str(champion_dir)})})  # fmt: skip
    write_jsonl(Path(config.paths.output_dir) / "eval.jsonl",
                ticket_eval_rows(tiny_tokenizer, 100, 5))  # fmt: skip
    challenger = lora_model(tiny_model_dir)
    calls = record_generate_calls(challenger)
    result = run_evaluation(config, model=challenger, tokenizer=tiny_tokenizer)

    one_model = [
        ("untimed", 1, 1), ("untimed", 1, 1),  # the prompt pass of each timed prompt
        ("untimed", 1, 5),  # one full-length request
        ("timed", 1, 5), ("timed", 1, 5),  # the timed requests, alone
        ("untimed", 3, 5),  # the other rows, batched
    ]  # fmt: skip
    order = [which for which, *_ in calls]
    assert order == ["default"] * 6 + ["base"] * 6 + ["compared"] * 6
    for which in ("default", "base", "compared"):
        assert [c[1:] for c in calls if c[0] == which] == one_model, which
    assert gc.isenabled()  # paused only around the timed requests
    assert result["comparedTimingComparable"] is True
    compared, mine = result["comparedMetrics"], result["metrics"]
    assert compared is not None and mine is not None and result["baseMetrics"] is not None
    for metric in ("latencyP50Ms", "latencyP95Ms", "tokensPerSecond"):
        assert metric in compared and metric in mine and metric in result["baseMetrics"]


@pytest.mark.slow
def test_the_trainers_result_says_the_compared_timing_was_measured_alike(
    tiny_model_dir: Path, champion_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Train, evaluate and report through the trainer CLI: the result line the operator reads
    carries comparedTimingComparable beside comparedMetrics."""
    from finetune_trainer.cli import main
    from support.trainer_samples import json_task_rows, make_config, write_config

    train = write_jsonl(tmp_path / "train.jsonl", json_task_rows(12))
    evaluation = {"maxNewTokens": 3, "maxSamples": 3, "latencyRequests": 1,
                  "compareWith": {"uri": f"file://{champion_dir}",
                                  "digest": digest_of(champion_dir)}}  # fmt: skip
    config = make_config(tiny_model_dir, train, tmp_path / "out", training={"maxSteps": 1},
                         dataset={"evalSplit": 0.25}, extra_spec={"evaluation": evaluation})  # fmt: skip
    config["paths"]["comparedAdapter"] = str(champion_dir)
    assert main(["train", "--config", str(write_config(tmp_path / "job.json", config))]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "out" / "termination-log").read_text())
    assert result["comparedTimingComparable"] is True
    assert {"latencyP50Ms", "tokensPerSecond"} <= set(result["comparedMetrics"])
    assert {"latencyP50Ms", "tokensPerSecond"} <= set(result["metrics"])
