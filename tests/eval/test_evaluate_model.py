"""Evaluation with a real (tiny, random) model: loss, batched generation, files, base metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from evalkit import ticket_eval_rows, train_adapter_steps, write_jsonl
from finetune_operator.api.trainer_config import PROGRESS_PREFIX, TrainerConfig
from finetune_trainer.evaluate import (
    EvalRow,
    completion_loss,
    generate,
    main,
    parse_eval_row,
    run_evaluation,
)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _rows(tokenizer: Any, start: int, count: int) -> list[EvalRow]:
    return [parse_eval_row(r, "test") for r in ticket_eval_rows(tokenizer, start, count)]


def test_left_padded_batch_generates_what_each_prompt_generates_alone(
    base_model: Any, tiny_tokenizer: Any
) -> None:
    rows = _rows(tiny_tokenizer, 0, 3)
    # Make the prompts differ in length so that padding matters.
    rows[1] = EvalRow(prompt=rows[1].prompt.replace("Classify", "Please classify this"))
    lengths = {len(tiny_tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in rows}
    assert len(lengths) > 1
    kwargs = {"max_new_tokens": 8, "max_prompt_tokens": 200}
    batched = generate(base_model, tiny_tokenizer, rows, batch_size=3, **kwargs)
    alone = [generate(base_model, tiny_tokenizer, [r], batch_size=1, **kwargs) for r in rows]
    assert batched.texts == [a.texts[0] for a in alone]
    assert batched.batch_sizes == [3]
    # A random model never says EOS: every row uses the whole budget.
    assert batched.generated_tokens == 3 * 8


def test_timed_requests_run_alone_and_the_rest_in_batches(
    base_model: Any, tiny_tokenizer: Any
) -> None:
    rows = _rows(tiny_tokenizer, 0, 5)
    kwargs = {"max_new_tokens": 6, "max_prompt_tokens": 200}
    timed = generate(base_model, tiny_tokenizer, rows, batch_size=4, timed_requests=2, **kwargs)
    # Two requests alone (batch 1, each timed), then the other three in one batch.
    assert timed.batch_sizes == [1, 1, 3]
    assert len(timed.request_seconds) == 2 and all(s > 0 for s in timed.request_seconds)
    assert timed.request_tokens == [6, 6]  # a random model never says EOS
    # Timing changes how rows are grouped, never what is generated.
    untimed = generate(base_model, tiny_tokenizer, rows, batch_size=4, **kwargs)
    assert timed.texts == untimed.texts and untimed.request_seconds == []
    # More timed requests than rows: every row is timed, none is batched.
    few = generate(base_model, tiny_tokenizer, rows[:2], batch_size=4, timed_requests=9, **kwargs)
    assert few.batch_sizes == [1, 1] and len(few.request_seconds) == 2


def test_latency_requests_zero_leaves_latency_out_and_a_gate_would_say_why(
    config_factory: Callable[..., TrainerConfig], tiny_tokenizer: Any
) -> None:
    from finetune_operator.domain.gates import evaluate_gates

    config = config_factory(evaluation={"maxNewTokens": 4, "latencyRequests": 0})
    out = Path(config.paths.output_dir)
    write_jsonl(out / "eval.jsonl", ticket_eval_rows(tiny_tokenizer, 0, 3))
    base = run_evaluation(config, base_only=True)["baseMetrics"]
    assert {"latencyP50Ms", "latencyP95Ms", "tokensPerSecond"}.isdisjoint(base)
    assert "evalLoss" in base and "rougeL" in base
    # The API refuses such a gate with latencyRequests 0; evaluated anyway, it says why.
    (verdict,) = evaluate_gates([{"metric": "latencyP95Ms", "max": 60000}], base, None)
    assert verdict["passed"] is False and "latencyRequests is 0" in verdict["reason"]


def test_completion_loss_is_token_weighted_mean_over_completion_tokens(
    base_model: Any, tiny_tokenizer: Any
) -> None:
    import torch

    rows = [
        EvalRow(prompt="<|user|>\nhi<|end|>\n<|assistant|>\n", completion="hello there"),
        EvalRow(prompt="<|user|>\nx<|end|>\n<|assistant|>\n", completion='{"a": 1, "b": [2, 3]}'),
    ]
    total, count = 0.0, 0
    for row in rows:
        p = tiny_tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
        c = tiny_tokenizer(row.completion + "<|end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(base_model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        nll = -logp[torch.arange(len(targets)), targets][len(p) - 1 :]
        total += float(nll.sum())
        count += len(c)
    with torch.no_grad():
        loss = completion_loss(base_model, tiny_tokenizer, rows, batch_size=2, max_length=256)
    assert loss == pytest.approx(total / count, rel=1e-4)
    assert completion_loss(base_model, tiny_tokenizer, [EvalRow(prompt="p")], 2, 256) is None


def test_base_only_writes_base_metrics_and_gives_a_verdict(
    config_factory: Callable[..., TrainerConfig], tiny_tokenizer: Any
) -> None:
    config = config_factory(
        gates=[{"metric": "jsonValidity", "min": 0.9}, {"metric": "safetyRefusal", "min": 0.5}]
    )
    out = Path(config.paths.output_dir)
    write_jsonl(out / "eval.jsonl", ticket_eval_rows(tiny_tokenizer, 100, 4))
    result = run_evaluation(config, base_only=True)

    assert result["metrics"] is None and result["judged"] == "base"
    base = json.loads((out / "base_metrics.json").read_text())
    assert base == result["baseMetrics"]
    assert not (out / "metrics.json").exists()
    expected = {"evalLoss", "perplexity", "rougeL", "exactMatch", "jsonValidity"}
    expected |= {"jsonSchemaConformance", "latencyP50Ms", "latencyP95Ms", "tokensPerSecond"}
    assert set(base) == expected  # no mustRefuse rows: safetyRefusal omitted
    assert base["perplexity"] == pytest.approx(math.exp(base["evalLoss"]))
    assert base["jsonValidity"] == 0.0  # a random model writes no JSON
    assert base["latencyP50Ms"] > 0 and base["tokensPerSecond"] > 0
    assert result["gatesPassed"] is False and result["gatesSummary"] == "0/2 passed"
    assert "jsonValidity 0 < 0.9 (short by 0.9)" in result["gatesMessage"]
    assert "safetyRefusal was not measured" in result["gatesMessage"]
    generations = (out / "eval_generations.jsonl").read_text().splitlines()
    assert len(generations) == 4 and "baseGeneration" in json.loads(generations[0])


@pytest.mark.slow
def test_adapter_and_base_metrics_from_the_same_loaded_weights(
    config_factory: Callable[..., TrainerConfig], tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = config_factory(
        gates=[{"metric": "evalLoss", "minImprovementOverBase": 0.05}],
        evaluation={"maxSamples": 6},
    )
    out = Path(config.paths.output_dir)
    write_jsonl(out / "eval.jsonl", ticket_eval_rows(tiny_tokenizer, 100, 8))
    base_result = run_evaluation(config, base_only=True, out=out / "plain_base.json")

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    train_adapter_steps(model, tiny_tokenizer, ticket_eval_rows(tiny_tokenizer, 0, 16), 8, 5e-3)
    in_memory = run_evaluation(config, model=model, tokenizer=tiny_tokenizer)

    # needs_base_metrics() is true: both files, base computed with the adapter disabled.
    metrics = json.loads((out / "metrics.json").read_text())
    base = json.loads((out / "base_metrics.json").read_text())
    assert metrics == in_memory["metrics"] and base == in_memory["baseMetrics"]
    assert base["evalLoss"] == pytest.approx(base_result["baseMetrics"]["evalLoss"], rel=1e-5)
    assert metrics["evalLoss"] < base["evalLoss"] - 0.05
    assert in_memory["gates"][0]["passed"] is True
    assert in_memory["gates"][0]["baseValue"] == pytest.approx(base["evalLoss"])
    assert in_memory["rows"]["evaluated"] == 6

    # The same adapter saved and loaded from disk gives the same loss.
    model.save_pretrained(out / "adapter")
    from_disk = run_evaluation(config, out=out / "disk.json")
    assert from_disk["metrics"]["evalLoss"] == pytest.approx(metrics["evalLoss"], rel=1e-4)


def test_cli_reports_missing_adapter_with_exit_5(
    config_factory: Callable[..., TrainerConfig],
    tiny_tokenizer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = config_factory()
    out = Path(config.paths.output_dir)
    write_jsonl(out / "eval.jsonl", ticket_eval_rows(tiny_tokenizer, 0, 2))
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(config.model_dump(by_alias=True, mode="json")))
    assert main(["--config", str(cfg)]) == 5
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1].removeprefix(PROGRESS_PREFIX))
    assert result["ok"] is False and result["reason"] == "EvaluationFailed"
    assert "adapter_config.json missing" in result["message"]


def test_cli_rejects_bad_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("jobName: x\nspec: {}\n")
    assert main(["--config", str(bad)]) == 2
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2


@pytest.mark.slow
def test_qlora_job_is_evaluated_on_the_4bit_base(
    config_factory: Callable[..., TrainerConfig], tiny_tokenizer: Any
) -> None:
    import bitsandbytes as bnb
    from finetune_trainer.evaluate import load_base

    config = config_factory(method="qlora", evaluation={"maxNewTokens": 4, "maxSamples": 2})
    out = Path(config.paths.output_dir)
    write_jsonl(out / "eval.jsonl", ticket_eval_rows(tiny_tokenizer, 0, 2))
    model, tokenizer = load_base(config)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    result = run_evaluation(config, model=model, tokenizer=tokenizer, base_only=True)
    base = result["baseMetrics"]
    assert base["evalLoss"] > 0 and base["tokensPerSecond"] > 0
    assert json.loads((out / "base_metrics.json").read_text()) == base


def test_trainer_cli_delegates_evaluate_with_an_eval_file(
    config_factory: Callable[..., TrainerConfig],
    tiny_tokenizer: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from finetune_trainer import cli

    config = config_factory(
        gates=[{"metric": "jsonValidity", "min": 0.5}], evaluation={"maxNewTokens": 4}
    )
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(config.model_dump(by_alias=True, mode="json")))
    other = write_jsonl(tmp_path / "other-eval.jsonl", ticket_eval_rows(tiny_tokenizer, 500, 3))
    target = tmp_path / "elsewhere" / "base.json"
    args = ["evaluate", "--config", str(cfg), "--base-only", "--eval-file", str(other)]
    assert cli.main([*args, "--out", str(target)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1].removeprefix(PROGRESS_PREFIX))
    assert result["ok"] is True and result["gatesSummary"] == "0/1 passed"
    assert json.loads(target.read_text()) == result["baseMetrics"]
    assert len((target.parent / "eval_generations.jsonl").read_text().splitlines()) == 3
    assert "FAIL jsonValidity >= 0.5" in captured.err
