"""The shell reader behind `sh -c` servers: words as the shell passes them, with their spans."""

from __future__ import annotations

import pytest
from finetune_operator.serving import shell_words as sw


def words(script: str) -> list[str]:
    return [t.value for t in sw.lex(script) if t.op is None]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("vllm serve 'a b' \"c d\" e\\ f", ["vllm", "serve", "a b", "c d", "e f"]),
        ("vllm serve m \\\n  --port 1", ["vllm", "serve", "m", "--port", "1"]),
        ('echo "x\\"y" # comment', ["echo", 'x"y']),
        ("a=1 b='2 3' cmd", ["a=1", "b=2 3", "cmd"]),
    ],
)
def test_words(script: str, expected: list[str]) -> None:
    assert words(script) == expected


def test_spans_point_at_the_written_text() -> None:
    script = "exec vllm serve 'org/m' --port 1"
    tok = [t for t in sw.lex(script) if t.op is None][3]
    assert (tok.value, script[tok.start : tok.end]) == ("org/m", "'org/m'")


def test_dynamic_words() -> None:
    toks = [t for t in sw.lex("a $X \"$(date)\" '$literal' ~/x") if t.op is None]
    assert [t.dynamic for t in toks] == [False, True, True, False, True]


def test_commands_split_on_operators_and_drop_redirections() -> None:
    cmds = sw.commands(sw.lex("cd /w && vllm serve m 2>&1 > /log | tee x; echo done"))
    assert [[t.value for t in c] for c in cmds] == [
        ["cd", "/w"],
        ["vllm", "serve", "m"],
        ["tee", "x"],
        ["echo", "done"],
    ]


@pytest.mark.parametrize("script", ["cat <<EOF\nx\nEOF", "echo 'open", 'echo "open'])
def test_refused(script: str) -> None:
    with pytest.raises(sw.ShellSyntaxError):
        sw.lex(script)
