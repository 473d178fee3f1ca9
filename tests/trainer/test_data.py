"""The data step on real files and the tiny model's tokenizer: formats, cleaning, split, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.finetunejob import DatasetSpec
from finetune_trainer.data import (
    check_usable,
    load_tokenizer,
    prepare_data,
    split_indices,
    write_data_outputs,
)
from finetune_trainer.errors import TrainerError
from support.trainer_samples import json_task_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)[0]


def spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": {"uri": "file:///d"}, **kw})


def prep(tokenizer: Any, train: Path, eval_path: Path | None = None, **kw: Any) -> Any:
    return prepare_data(spec(**kw), train, eval_path, tokenizer, max_seq_length=128, seed=7)


PC = [{"prompt": f"question {i}?", "completion": f"answer number {i}"} for i in range(20)]
INSTR = [
    {"instruction": f"Translate item {i}", "input": f"text {i}", "output": f"texte {i}"}
    for i in range(20)
]
MSGS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": f"hello {i}"},
        ]
    }
    for i in range(20)
]


def _write(path: Path, kind: str, rows: list[dict[str, Any]]) -> Path:
    if kind == "jsonl":
        return write_jsonl(path / "data.jsonl", rows)
    if kind == "json":
        (path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
        return path / "data.json"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path / "data.parquet")
        return path / "data.parquet"
    if kind == "save_to_disk":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path / "saved"))
        return path / "saved"
    if kind == "folder":
        (path / "parts").mkdir()
        write_jsonl(path / "parts" / "a.jsonl", rows[:10])
        write_jsonl(path / "parts" / "b.jsonl", rows[10:])
        return path / "parts"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "save_to_disk", "folder"])
@pytest.mark.parametrize(
    ("fmt", "rows"),
    [("prompt-completion", PC), ("instruction", INSTR), ("messages", MSGS)],
)
def test_every_file_kind_and_format_loads(
    tmp_path: Path, tokenizer: Any, kind: str, fmt: str, rows: list[dict[str, Any]]
) -> None:
    path = _write(tmp_path, kind, rows)
    for requested in (fmt, "auto"):
        prepared = prep(tokenizer, path, format=requested)
        report = prepared.report
        assert report.format == fmt
        assert report.rows_read == 20 and report.rows_kept == 20
        assert report.train_rows + report.eval_rows == 20 and report.eval_rows == 2
        first = prepared.train[0]
        # The completion (and only it) carries labels; the prompt ends with the generation prompt.
        assert first.prompt_text.endswith("<|assistant|>\n")
        n_masked = sum(1 for label in first.labels if label == -100)
        assert 0 < n_masked < len(first.input_ids)
        learned = tokenizer.decode([t for t in first.labels if t != -100])
        assert learned.startswith(first.example.completion)
        assert learned.endswith("<|end|>\n")


def test_instruction_input_is_part_of_the_prompt(tmp_path: Path, tokenizer: Any) -> None:
    prepared = prep(tokenizer, _write(tmp_path, "jsonl", INSTR))
    ex = (prepared.train + prepared.eval)[0].example
    assert ex.prompt_messages[0]["content"].startswith("Translate item")
    assert "\n\ntext " in ex.prompt_messages[0]["content"]


def test_multi_turn_messages_train_on_the_last_assistant_turn(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"a {i}"},
                {"role": "assistant", "content": f"b {i}"},
                {"role": "user", "content": f"c {i}"},
                {"role": "assistant", "content": f"final answer {i}"},
            ]
        }
        for i in range(10)
    ]
    prepared = prep(tokenizer, write_jsonl(tmp_path / "m.jsonl", rows))
    t = prepared.train[0]
    assert t.example.completion.startswith("final answer")
    assert len(t.example.prompt_messages) == 3
    assert tokenizer.decode([x for x in t.labels if x != -100]).startswith("final answer")


def test_completion_only_false_trains_on_every_token(tmp_path: Path, tokenizer: Any) -> None:
    prepared = prep(tokenizer, _write(tmp_path, "jsonl", PC), completionOnly=False)
    t = prepared.train[0]
    assert t.labels == t.input_ids


def test_spec_chat_template_overrides_the_model(tiny_model: Path, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok, source = load_tokenizer(tiny_model, template)
    assert source == "spec"
    prepared = prepare_data(
        spec(chatTemplate=template), _write(tmp_path, "jsonl", PC), None, tok, 128, 7, source
    )
    assert prepared.train[0].prompt_text.startswith("[user] question")
    assert prepared.report.chat_template == "spec"


def test_cleaning_counts_every_drop_reason(tmp_path: Path, tokenizer: Any) -> None:
    rows: list[Any] = [dict(r) for r in PC]
    rows += [
        {"prompt": "question 3?", "completion": "answer number 3"},  # exact duplicate
        {"prompt": "  QUESTION 4? ", "completion": "Answer   number 4"},  # normalised duplicate
        {"prompt": "", "completion": "x"},  # empty prompt
        {"prompt": "hi", "completion": "   "},  # empty completion
        {"prompt": 5, "completion": "x"},  # wrong type
        ["not", "an", "object"],
        {"prompt": "long " * 200, "completion": "too long"},
        {"prompt": "short", "completion": "a"},
    ]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as f:
        f.write("{not json\n")
    prepared = prep(tokenizer, path, cleaning={"minTokens": 2})
    r = prepared.report
    assert r.rows_read == len(rows) + 1
    assert r.dropped == {
        "duplicate": 2,
        "empty": 2,
        "invalidType": 1,
        "invalidRow": 1,
        "tooLong": 1,
        "tooShort": 1,
        "invalidJson": 1,
    }
    assert r.duplicates == 2
    assert r.duplicate_rate == pytest.approx(2 / (len(rows) + 1))
    assert r.rows_kept == 20
    assert set(r.token_length_percentiles) == {"p50", "p90", "p99", "max"}
    assert r.token_length_percentiles["max"] <= 128


def test_dedup_off_keeps_duplicates_but_counts_them(tmp_path: Path, tokenizer: Any) -> None:
    rows = PC + PC[:5]
    prepared = prep(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), cleaning={"dedup": False})
    assert prepared.report.rows_kept == 25
    assert prepared.report.duplicates == 5
    assert "duplicate" not in prepared.report.dropped


def test_pii_is_masked_and_counted(tmp_path: Path, tokenizer: Any) -> None:
    rows = [dict(r) for r in PC]
    rows[0] = {"prompt": "mail me at kim@example.com", "completion": "call 010-1234-5678"}
    rows[1] = {"prompt": "my card 4111 1111 1111 1111", "completion": "noted, 900101-1234567"}
    prepared = prep(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    r = prepared.report
    assert r.pii_masked == 4
    assert r.pii_by_kind == {"email": 1, "phone": 1, "creditCard": 1, "nationalId": 1}
    texts = " ".join(t.prompt_text + t.completion_text for t in prepared.train + prepared.eval)
    assert "kim@example.com" not in texts and "[EMAIL]" in texts
    assert "4111" not in texts and "010-1234" not in texts

    off = prep(
        tokenizer, write_jsonl(tmp_path / "e.jsonl", rows), cleaning={"piiMask": {"enabled": False}}
    )
    assert off.report.pii_masked == 0


def test_split_is_deterministic_and_order_independent() -> None:
    keys = [f"k{i}" for i in range(100)]
    train, held = split_indices(keys, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert split_indices(keys, 0.1, seed=3) == (train, held)
    assert split_indices(keys, 0.1, seed=4)[1] != held
    reversed_keys = list(reversed(keys))
    _, held_rev = split_indices(reversed_keys, 0.1, seed=3)
    # The same rows are held out whatever the order of the file.
    assert {reversed_keys[i] for i in held_rev} == {keys[i] for i in held}


def test_split_uses_eval_split_and_seed(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", json_task_rows(40))
    a = prep(tokenizer, path, evalSplit=0.25)
    b = prep(tokenizer, path, evalSplit=0.25)
    assert a.report.eval_rows == 10 and a.report.train_rows == 30
    assert [t.prompt_text for t in a.eval] == [t.prompt_text for t in b.eval]
    assert a.report.digest == b.report.digest and a.report.digest.startswith("sha256:")


def test_eval_file_is_cleaned_and_drops_rows_seen_in_train(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", PC)
    eval_rows = [{"prompt": "new q?", "completion": "new a"}, PC[0]]
    ev = write_jsonl(tmp_path / "e.jsonl", eval_rows)
    prepared = prepare_data(
        DatasetSpec.model_validate({"train": {"uri": "file:///t"}, "eval": {"uri": "file:///e"}}),
        train,
        ev,
        tokenizer,
        128,
        7,
    )
    r = prepared.report
    assert r.train_rows == 20 and r.eval_rows == 1
    assert r.eval_source == "file" and r.eval_dropped == {"overlapsTrain": 1}


def test_eval_jsonl_and_report_are_written(tmp_path: Path, tokenizer: Any) -> None:
    rows = json_task_rows(20)
    rows[0]["json_schema"] = {"type": "object", "required": ["intent"]}
    rows[1]["must_refuse"] = True
    prepared = prep(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), evalSplit=0.45)
    write_data_outputs(prepared, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["rowsRead"] == 20 and report["evalRows"] == 9
    lines = [json.loads(x) for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == 9
    for line in lines:
        assert set(line) == {"prompt", "messages", "completion", "task", "jsonSchema", "mustRefuse"}
        assert line["task"] == "json"
        assert line["prompt"].endswith("<|assistant|>\n")
        assert json.loads(line["completion"])["priority"] == "high"


# ------------------------------------------------------------------ errors, table-driven


def _err(tokenizer: Any, path: Path, **kw: Any) -> TrainerError:
    with pytest.raises(TrainerError) as info:
        prepared = prep(tokenizer, path, **kw)
        check_usable(prepared.report, spec(**kw).cleaning)
    return info.value


ERRORS: list[tuple[str, Any, dict[str, Any], str, list[str]]] = [
    ("missing file", None, {}, "DataNotFound", ["does not exist"]),
    (
        "empty folder",
        "folder-empty",
        {},
        "DataNotFound",
        ["has no .jsonl", "save_to_disk"],
    ),
    ("empty file", [], {}, "DataUnusable", ["no rows found"]),
    (
        "unknown columns",
        [{"question": "q", "answer": "a"}],
        {},
        "DataUnusable",
        [
            "cannot detect the data format",
            "columns found: answer, question",
            "prompt-completion: prompt + completion",
            "instruction: instruction + output (optional: input)",
            "messages: messages",
            "dataset.format",
        ],
    ),
    (
        "format columns missing",
        [{"prompt": "q", "completion": "a"}],
        {"format": "instruction"},
        "DataUnusable",
        [
            "format instruction needs columns instruction, output",
            "columns found: completion, prompt",
        ],
    ),
    (
        "json not a list",
        '{"prompt": "q"}',
        {},
        "DataUnusable",
        ["expected a JSON list of row objects", "use .jsonl"],
    ),
    ("json syntax", "[{", {}, "DataUnusable", ["not valid JSON"]),
    ("jsonl all bad", "{bad\n{worse\n", {}, "DataUnusable", ["no line is valid JSON"]),
    ("unsupported suffix", "a,b\n", {}, "DataUnusable", ["unsupported file type .csv"]),
    (
        "too few rows",
        PC[:5],
        {},
        "DataUnusable",
        ["only 4 training rows remain", "minRows 8", "lower minRows"],
    ),
    (
        "too many duplicates",
        PC[:4] * 5,
        {"cleaning": {"minRows": 1}},
        "DataUnusable",
        ["16 of 20 rows are duplicates (80%)", "maxDuplicateRate 50%", "deduplicate"],
    ),
    (
        "all rows too long",
        [{"prompt": "word " * 300 + str(i), "completion": "x y"} for i in range(10)],
        {},
        "DataUnusable",
        ["only 0 training rows remain", "tooLong: 10", "maxSeqLength"],
    ),
]


@pytest.mark.parametrize(
    ("case", "content", "kw", "reason", "fragments"), ERRORS, ids=[e[0] for e in ERRORS]
)
def test_data_errors_say_what_to_change(
    tmp_path: Path,
    tokenizer: Any,
    case: str,
    content: Any,
    kw: dict[str, Any],
    reason: str,
    fragments: list[str],
) -> None:
    if content is None:
        path = tmp_path / "missing.jsonl"
    elif content == "folder-empty":
        path = tmp_path / "empty"
        path.mkdir()
        (path / "notes.txt").write_text("x")
    elif isinstance(content, list):
        path = write_jsonl(tmp_path / "d.jsonl", content)
    else:
        suffix = {
            "json not a list": ".json",
            "json syntax": ".json",
            "unsupported suffix": ".csv",
        }.get(case, ".jsonl")
        path = tmp_path / f"d{suffix}"
        path.write_text(content)
    err = _err(tokenizer, path, **kw)
    assert err.reason == reason
    assert err.exit_code == 3
    for fragment in fragments:
        assert fragment in err.message, (fragment, err.message)


def test_missing_model_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(TrainerError) as info:
        load_tokenizer(tmp_path / "nope")
    assert info.value.reason == "ModelNotFound"
    assert "baseModel.uri" in info.value.message
