"""Bad datasets through the real trainer CLI (`data-report`) with the tiny model: each ends in
a non-zero exit and a result that names what to fix, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import PROGRESS_PREFIX
from support.trainer_samples import REPO, json_task_rows, make_config, subprocess_env, write_config

SECRET = "hf_TOPSECRET_badinput_4242"


def good_rows(n: int = 24) -> list[dict[str, Any]]:
    return json_task_rows(n)


def lines(rows: list[Any]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def malformed(p: Path) -> Path:
    text = lines(good_rows(6)).splitlines()
    text.insert(3, '{"prompt": "broken", "completion": ')  # line 4
    p.write_text("\n".join(text) + "\n", encoding="utf-8")
    return p


def garbage(p: Path) -> Path:
    p.write_text("prompt,completion\nhello,world\n", encoding="utf-8")  # a CSV named .jsonl
    return p


def empty(p: Path) -> Path:
    p.write_text("", encoding="utf-8")
    return p


def all_duplicates(p: Path) -> Path:
    p.write_text(lines([good_rows(1)[0]] * 30), encoding="utf-8")
    return p


def pii_only(p: Path) -> Path:
    rows = [
        {"prompt": f"mail jane.doe{i}@example.com", "completion": f"call +1 415 555 01{i:02d}"}
        for i in range(20)
    ]
    p.write_text(lines(rows), encoding="utf-8")
    return p


def wrong_columns(p: Path) -> Path:
    p.write_text(lines([{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)]))
    return p


def non_utf8(p: Path) -> Path:
    p.write_bytes(lines(good_rows(4)).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    return p


def huge_row(p: Path) -> Path:
    rows = [*good_rows(2), {"prompt": "word " * 200_000, "completion": "ok"}]
    p.write_text(lines(rows), encoding="utf-8")
    return p


def giant_line(p: Path) -> Path:
    with p.open("wb") as f:
        f.write(lines(good_rows(2)).encode())
        f.write(b'{"prompt": "' + b"x" * 3_000_000 + b'", "completion": "ok"}\n')
    return p


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deeply_nested(p: Path) -> Path:
    deep = '{"prompt": ' + nested(50_000) + ', "completion": "x"}\n'
    p.write_text(lines(good_rows(10)) + deep * 20, encoding="utf-8")
    return p


def mixed_formats(p: Path) -> Path:
    rows: list[Any] = good_rows(10)
    rows += [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "yo"},
            ]
        }
        for i in range(12)
    ]
    rows += [{"instruction": f"say {i}", "output": f"{i} said"} for i in range(10)]
    p.write_text(lines(rows), encoding="utf-8")
    return p


def odd_unicode_only(p: Path) -> Path:
    rows = [{"prompt": "\u200f\u200b\u2067\u2069", "completion": "\u200b\ufeff"} for _ in range(20)]
    p.write_text(lines(rows), encoding="utf-8")
    return p


def empty_directory(p: Path) -> Path:
    d = p.parent / "train-dir"
    d.mkdir()
    (d / "README.txt").write_text("no data here\n")
    return d


def missing(p: Path) -> Path:
    return p.parent / "does-not-exist.jsonl"


def secret_in_rows(p: Path) -> Path:
    p.write_text(lines([{"prompt": f"token {SECRET}", "completion": SECRET}] * 25))
    return p


# (builder, exit code, reason, words the message must contain)
CASES: dict[str, tuple[Callable[[Path], Path], int, str, tuple[str, ...]]] = {
    "malformed-jsonl": (malformed, 3, "DataUnusable", ("invalidJson: 1",)),
    "no-valid-json-line": (garbage, 3, "DataUnusable", ("line 1", "line 2", "JSON object")),
    "empty-file": (empty, 3, "DataUnusable", ("empty", "train.jsonl")),
    "all-duplicates": (all_duplicates, 3, "DataUnusable", ("maxDuplicateRate",)),
    # Masked, every row reads "mail <EMAIL> / call <PHONE>": nothing distinct is left.
    "pii-only": (pii_only, 3, "DataUnusable", ("duplicates", "maxDuplicateRate")),
    "wrong-columns": (wrong_columns, 3, "DataUnusable", ("question", "prompt", "completion")),
    "non-utf8": (non_utf8, 3, "DataUnusable", ("line 5", "UTF-8", "0xe9")),
    "huge-row": (huge_row, 3, "DataUnusable", ("tooLong: 1", "maxSeqLength")),
    "giant-line": (giant_line, 3, "DataUnusable", ("tooLarge: 1", "maxSeqLength")),
    "deeply-nested": (
        deeply_nested,
        3,
        "DataUnusable",
        ("20 of 30 train rows were dropped", "tooDeep: 20", "maxDroppedShare"),
    ),
    "mixed-formats": (
        mixed_formats,
        3,
        "DataUnusable",
        ("otherFormat: 20", "prompt-completion: 10", "instruction: 10", "maxDroppedShare"),
    ),
    "invisible-characters-only": (odd_unicode_only, 3, "DataUnusable", ("duplicates",)),
    "directory-without-data": (empty_directory, 3, "DataNotFound", ("train-dir", ".jsonl")),
    "missing-file": (missing, 3, "DataNotFound", ("does-not-exist.jsonl",)),
}


def run_data_report(
    cfg: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str]:
    from finetune_trainer.cli import main

    code = main(["data-report", "--config", str(cfg)])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    results = [
        json.loads(line[len(PROGRESS_PREFIX) :])
        for line in captured.out.splitlines()
        if line.startswith(PROGRESS_PREFIX) and '"result"' in line
    ]
    return code, results[-1] if results else {}, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_names_what_to_fix(
    case: str,
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    build, code, reason, words = CASES[case]
    train = build(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, out))
    got_code, result, output = run_data_report(cfg, capsys)
    assert result, f"no result line; output: {output[-2000:]}"
    print(case, got_code, result.get("reason"), result.get("message"))
    assert (got_code, result["reason"]) == (code, reason), result
    assert result["ok"] is False
    message = result["message"]
    assert len(message) > 20 and "Traceback" not in output
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


def test_a_dropped_jsonl_line_is_named_in_the_log(
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = lines(good_rows(24)).splitlines()
    rows.insert(3, '{"prompt": "broken", "completion": ')
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, tmp_path / "out"))
    code, result, _ = run_data_report(cfg, capsys)
    assert code == 0 and result == {}  # one bad line is dropped, not fatal
    assert "line 4" in caplog.text and "train.jsonl" in caplog.text
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["dropped"]["invalidJson"] == 1


def test_secret_looking_rows_never_reach_the_result(
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train = secret_in_rows(tmp_path / "train.jsonl")
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, tmp_path / "out"))
    code, result, output = run_data_report(cfg, capsys)
    assert code == 3  # all duplicates
    assert SECRET not in json.dumps(result) and SECRET not in output


def test_odd_unicode_rows_are_kept_intact(
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """RTL marks, zero-width characters and emoji are text like any other: no crash, no loss."""
    odd = [
        "\u200f\u05e9\u05dc\u05d5\u05dd\u200f",  # Hebrew between RTL marks
        "a\u200bb\u200dc",  # zero-width space and joiner
        "\U0001f642\U0001f469\u200d\U0001f4bb",  # emoji, a ZWJ sequence
        "\u2067\u0645\u0631\u062d\u0628\u0627\u2069",  # Arabic in an RTL isolate
        "e\u0301\ufeff",  # combining accent, BOM
    ]
    rows = [
        {
            "prompt": f"{odd[i % len(odd)]} ticket {i}",
            "completion": f"{odd[(i + 1) % len(odd)]} {i}",
        }
        for i in range(30)
    ]
    train = tmp_path / "train.jsonl"
    train.write_text(lines(rows), encoding="utf-8")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, out))
    code, result, output = run_data_report(cfg, capsys)
    assert code == 0 and result == {}, output[-2000:]
    report = json.loads((out / "data_report.json").read_text())
    assert report["rowsKept"] == 30 and report["dropped"] == {}


def test_a_byte_order_mark_keeps_every_row(
    tmp_path: Path,
    tiny_model: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(lines(good_rows(24)), encoding="utf-8-sig")  # as some editors save
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, out))
    code, result, output = run_data_report(cfg, capsys)
    assert code == 0 and result == {}, output[-2000:]
    report = json.loads((out / "data_report.json").read_text())
    assert report["rowsRead"] == 24 and report["rowsKept"] == 24 and report["dropped"] == {}


def fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


SUBPROCESS_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "deeply-nested": (deeply_nested, ("tooDeep: 20",)),
    "fifo": (fifo, ("train.jsonl is a FIFO (named pipe), not a regular file",)),
}


@pytest.mark.slow  # the trainer CLI in its own process
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_the_trainer_command_exits_with_the_data_error(
    case: str,
    tmp_path: Path,
    tiny_model: Path,
) -> None:
    """The real command in its own process: exit 3, the reason on stdout and in the
    termination message, no traceback, no hang."""
    build, words = SUBPROCESS_CASES[case]
    train = build(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    out.mkdir()  # where the termination message goes (in a pod: /dev/termination-log)
    cfg = write_config(tmp_path / "job.json", make_config(tiny_model, train, out))
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(cfg)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    results = [
        json.loads(line[len(PROGRESS_PREFIX) :])
        for line in proc.stdout.splitlines()
        if line.startswith(PROGRESS_PREFIX) and '"result"' in line
    ]
    assert results and results[-1]["reason"] == "DataUnusable" and results[-1]["ok"] is False
    for word in words:
        assert word in results[-1]["message"], (word, results[-1]["message"])
    termination = json.loads((out / "termination-log").read_text())
    assert termination["reason"] == "DataUnusable"
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()
