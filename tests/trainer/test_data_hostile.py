"""Hostile data files through the data step with the tiny model's tokenizer: giant rows, pipes
and devices, deep nesting, byte order marks, files mixing formats."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.finetunejob import DatasetSpec
from finetune_trainer.data import (
    Example,
    check_usable,
    load_tokenizer,
    prepare_data,
    read_records,
    tokenize_example,
)
from finetune_trainer.errors import TrainerError
from support.trainer_samples import json_task_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(tiny_model)[0]


class LongestTextSeen:
    """The real tokenizer, noting the longest text it was asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.longest = 0

    def __call__(self, text: str, **kw: Any) -> Any:
        self.longest = max(self.longest, len(text))
        return self._inner(text, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": {"uri": "file:///d"}, **kw})


def prep(tokenizer: Any, train: Path, max_seq_length: int = 128, **kw: Any) -> Any:
    return prepare_data(spec(**kw), train, None, tokenizer, max_seq_length, seed=7)


def data_error(tokenizer: Any, train: Path, **kw: Any) -> TrainerError:
    with pytest.raises(TrainerError) as info:
        prepared = prep(tokenizer, train, **kw)
        check_usable(prepared.report, spec(**kw).cleaning)
    assert info.value.exit_code == 3
    return info.value


def jsonl_with(path: Path, extra_lines: list[bytes], rows: int = 20) -> Path:
    write_jsonl(path, json_task_rows(rows))
    with path.open("ab") as f:
        for line in extra_lines:
            f.write(line + b"\n")
    return path


# ------------------------------------------------------------------ row size


def test_a_giant_jsonl_line_is_skipped_without_being_held(tmp_path: Path, tokenizer: Any) -> None:
    giant = b'{"prompt": "' + b"word " * 4_000_000 + b'", "completion": "ok"}'  # 20 MB
    path = jsonl_with(tmp_path / "d.jsonl", [giant])
    del giant
    seen = LongestTextSeen(tokenizer)
    tracemalloc.start()
    try:
        prepared = prep(seen, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.report.dropped == {"tooLarge": 1}
    assert prepared.report.rows_read == 21 and prepared.report.rows_kept == 20
    # Read in 1 MiB pieces and dropped: never held, decoded or parsed whole.
    assert peak < 8 * 2**20, peak
    assert seen.longest < 1000


def test_a_long_row_is_dropped_before_templating_and_tokenizing(
    tmp_path: Path, tokenizer: Any
) -> None:
    """Rows from .json files are already in memory: their text size is checked before any
    chat template or tokenizer sees them."""
    rows: list[dict[str, Any]] = json_task_rows(20)
    rows.append({"prompt": "word " * 100_000, "completion": "ok"})  # 500,000 characters
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    seen = LongestTextSeen(tokenizer)
    prepared = prep(seen, path)
    assert prepared.report.dropped == {"tooLong": 1}
    assert seen.longest < 1000  # the 500,000 characters were never tokenized


def test_rows_over_the_token_limit_are_tokenized_with_truncation(tokenizer: Any) -> None:
    ex = Example([{"role": "user", "content": "word " * 1000}], "answer " * 1000)
    t = tokenize_example(tokenizer, ex, completion_only=True, limit=129)
    assert len(t.input_ids) == 129 and len(t.labels) == 129
    assert t.completion_tokens == 129
    full = tokenize_example(tokenizer, ex, completion_only=True)
    assert len(full.input_ids) > 1000 and full.input_ids[:129] == t.input_ids


def test_text_just_under_the_size_bound_still_counts_tokens(tmp_path: Path, tokenizer: Any) -> None:
    rows: list[dict[str, Any]] = json_task_rows(20)
    rows.append({"prompt": "word " * 1000, "completion": "ok then"})  # 5,000 chars < 128 * 64
    prepared = prep(tokenizer, write_jsonl(tmp_path / "d.jsonl", rows))
    assert prepared.report.dropped == {"tooLong": 1}


# ------------------------------------------------------------------ files that are not files


def _read_in_thread(path: Path) -> Iterator[BaseException | None]:
    """read_records in a thread; yields what it raised (None when it returned) or hangs."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            read_records(path)
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout=20)
    try:
        assert outcome, f"reading {path} hung"
        yield outcome[0]
    finally:
        if worker.is_alive():  # let a reader blocked on the FIFO see end-of-file
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)


def _refusal(path: Path) -> TrainerError:
    for raised in _read_in_thread(path):
        assert isinstance(raised, TrainerError), raised
        assert raised.reason == "DataUnusable" and raised.exit_code == 3
        return raised
    raise AssertionError("unreachable")


def test_a_fifo_named_jsonl_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    err = _refusal(fifo)
    assert "train.jsonl is a FIFO (named pipe), not a regular file" in err.message


def test_a_fifo_in_a_data_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    write_jsonl(folder / "a.jsonl", json_task_rows(10))
    os.mkfifo(folder / "b.jsonl")
    err = _refusal(folder)
    assert "b.jsonl is a FIFO" in err.message


def test_a_fifo_in_a_save_to_disk_folder_is_refused(tmp_path: Path) -> None:
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_list(json_task_rows(10)).save_to_disk(str(saved))
    os.mkfifo(saved / "extra.arrow")
    assert "extra.arrow is a FIFO" in _refusal(saved).message


def test_a_device_behind_a_data_name_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "train.jsonl"
    link.symlink_to("/dev/null")
    assert "is a character device, not a regular file" in _refusal(link).message


def test_a_socket_named_jsonl_is_refused() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # short path: socket names are limited
        path = Path(d) / "s.jsonl"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
            assert "is a socket, not a regular file" in _refusal(path).message


# ------------------------------------------------------------------ nesting


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_lines_are_dropped_and_counted(tmp_path: Path, tokenizer: Any) -> None:
    deep_value = '{"prompt": ' + '{"a": ' * 200 + '"x"' + "}" * 200 + ', "completion": "y"}'
    brackets_in_text = json.dumps({"prompt": "[" * 70 + " ok", "completion": "fine then"})
    schema = json.dumps({"prompt": "q", "completion": "a b", "json_schema": nested(5000)})
    lines = [nested(100_000).encode(), deep_value.encode(), brackets_in_text.encode()]
    path = jsonl_with(tmp_path / "d.jsonl", [*lines, schema.encode()])
    prepared = prep(tokenizer, path)
    assert prepared.report.dropped == {"tooDeep": 3}
    assert prepared.report.rows_kept == 21  # brackets inside a string are text, not nesting


def test_a_deep_json_file_is_a_data_error_not_a_crash(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "d.json"
    path.write_text(nested(100_000))
    err = data_error(tokenizer, path)
    assert "nested too deeply" in err.message


def test_deep_rows_of_a_json_file_are_dropped(tmp_path: Path, tokenizer: Any) -> None:
    rows: list[Any] = json_task_rows(20)
    rows.append({"prompt": "q", "completion": "a", "meta": json.loads(nested(200))})
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    assert prep(tokenizer, path).report.dropped == {"tooDeep": 1}


def test_a_file_of_only_deep_lines_says_so(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text((nested(10_000) + "\n") * 3)
    err = data_error(tokenizer, path)
    assert "no usable row (dropped tooDeep: 3)" in err.message


# ------------------------------------------------------------------ byte order mark


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path: Path, tokenizer: Any) -> None:
    rows = json_task_rows(20)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(rows), encoding="utf-8-sig")
    for path in (jsonl, as_json):
        report = prep(tokenizer, path).report
        assert report.rows_read == 20 and report.rows_kept == 20, path
        assert report.dropped == {}, path


def test_a_byte_order_mark_later_in_a_file_is_still_an_error(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = jsonl_with(tmp_path / "d.jsonl", ['\ufeff{"prompt": "q", "completion": "a b"}'.encode()])
    assert prep(tokenizer, path).report.dropped == {"invalidJson": 1}


# ------------------------------------------------------------------ mixed formats


PC = [{"prompt": f"question {i}?", "completion": f"answer number {i}"} for i in range(15)]
MSGS = [
    {
        "messages": [
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": f"hello there {i}"},
        ]
    }
    for i in range(25)
]


def test_rows_of_another_format_are_counted_and_warned_about(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", PC + MSGS)
    prepared = prep(tokenizer, path)
    report = prepared.report
    assert report.format == "messages"  # what most rows are
    assert report.dropped == {"otherFormat": 15} and report.rows_kept == 25
    assert report.to_wire()["warnings"] == [
        "train: 15 of 40 rows are in another format than the data's messages "
        "(prompt-completion: 15) and were dropped (otherFormat): convert them to messages or "
        "train on them in a separate job"
    ]
    check_usable(report, spec().cleaning)  # 38% dropped: within the default 50%


def test_a_mixed_file_fails_when_too_many_rows_are_dropped(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", PC + MSGS)
    err = data_error(tokenizer, path, format="prompt-completion")
    assert err.reason == "DataUnusable"
    for words in (
        "25 of 40 train rows were dropped (62%; otherFormat: 25)",
        "dataset.cleaning.maxDroppedShare 50%",
        "(messages: 25)",
        "convert them to prompt-completion",
        "raise maxDroppedShare",
    ):
        assert words in err.message, (words, err.message)
    stricter = data_error(tokenizer, path, cleaning={"maxDroppedShare": 0.3})
    assert "15 of 40 train rows were dropped (38%; otherFormat: 15)" in stricter.message


def test_the_dropped_share_counts_every_reason_but_duplicates(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows: list[Any] = [*json_task_rows(20), *[{"prompt": 1, "completion": "x"}] * 11]
    rows += json_task_rows(20)  # 20 duplicates: maxDuplicateRate's business
    err = data_error(
        tokenizer,
        write_jsonl(tmp_path / "d.jsonl", rows),
        cleaning={"maxDroppedShare": 0.2, "maxDuplicateRate": 0.9},
    )
    assert "11 of 51 train rows were dropped (22%; invalidType: 11)" in err.message
    assert "fix the rows" in err.message
    ok = prep(
        tokenizer, write_jsonl(tmp_path / "e.jsonl", rows), cleaning={"maxDuplicateRate": 0.9}
    )
    check_usable(ok.report, spec(cleaning={"maxDuplicateRate": 0.9}).cleaning)


def test_an_eval_file_is_held_to_the_same_share(tmp_path: Path, tokenizer: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", json_task_rows(20))
    ev = write_jsonl(tmp_path / "e.jsonl", PC[:4] + MSGS[:6])
    dataset = DatasetSpec.model_validate(
        {"train": {"uri": "file:///t"}, "eval": {"uri": "file:///e"}, "format": "prompt-completion"}
    )
    prepared = prepare_data(dataset, train, ev, tokenizer, 128, 7)
    assert prepared.report.eval_dropped == {"otherFormat": 6}
    with pytest.raises(TrainerError) as info:
        check_usable(prepared.report, dataset.cleaning)
    assert "6 of 10 eval rows were dropped (60%; otherFormat: 6)" in info.value.message
