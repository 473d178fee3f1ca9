"""Split a POSIX shell script into words and simple commands, keeping where each word is.

Enough of the shell language for the scripts container specs run with ``sh -c``: quotes,
backslash escapes and line continuations, ``$VAR``/``$(...)`` (marked dynamic: their value
is only known at run time), comments, control operators (``&&``, ``||``, ``;``, ``|``,
``&``, newlines) and redirections. Here-documents are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


class ShellSyntaxError(ValueError):
    """The script uses a construct this reader does not handle."""


@dataclass(frozen=True)
class Tok:
    """A word (``op`` None; ``value`` unquoted) or an operator, with its span in the script."""

    op: str | None  # operator text, or None for a word
    value: str
    start: int
    end: int
    dynamic: bool = False


_OPS = ("&&", "||", ";;", ">>", ">&", "<&", "<<", ";", "&", "|", "(", ")", "<", ">", "\n")
ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def lex(script: str) -> list[Tok]:
    """Split a POSIX shell script into words (with their unquoted values) and operators."""
    toks: list[Tok] = []
    i, n = 0, len(script)
    while i < n:
        c = script[i]
        if c in " \t\r":
            i += 1
            continue
        if script.startswith("\\\n", i):
            i += 2
            continue
        if c == "#":
            while i < n and script[i] != "\n":
                i += 1
            continue
        op = next((o for o in _OPS if script.startswith(o, i)), None)
        if op is not None:
            if op == "<<":
                raise ShellSyntaxError("here-documents in the shell script are not supported")
            toks.append(Tok(op, op, i, i + len(op)))
            i += len(op)
            continue
        toks.append(_word(script, i))
        i = toks[-1].end
    return toks


def _word(s: str, i: int) -> Tok:
    start, buf, dynamic, n = i, [], False, len(s)
    while i < n and s[i] not in " \t\r\n;&|()<>":
        c = s[i]
        if c == "'":
            j = s.find("'", i + 1)
            if j < 0:
                raise ShellSyntaxError("unterminated ' in the shell script")
            buf.append(s[i + 1 : j])
            i = j + 1
        elif c == '"':
            i += 1
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n and s[i + 1] in '$`"\\\n':
                    if s[i + 1] != "\n":
                        buf.append(s[i + 1])
                    i += 2
                    continue
                if s[i] in "$`":
                    dynamic = True
                buf.append(s[i])
                i += 1
            if i >= n:
                raise ShellSyntaxError('unterminated " in the shell script')
            i += 1
        elif c == "\\":
            if i + 1 < n and s[i + 1] != "\n":
                buf.append(s[i + 1])
            i += 2
        elif c == "$" and s.startswith("$(", i):
            depth, j = 0, i + 1
            while j < n:
                depth += {"(": 1, ")": -1}.get(s[j], 0)
                j += 1
                if depth == 0:
                    break
            buf.append(s[i:j])
            dynamic, i = True, j
        else:
            if c in "$`*?[" or (c == "~" and i == start):
                dynamic = True
            buf.append(c)
            i += 1
    return Tok(None, "".join(buf), start, i, dynamic)


def commands(toks: Sequence[Tok]) -> list[list[Tok]]:
    """Simple commands: words between control operators, redirections dropped."""
    out: list[list[Tok]] = [[]]
    skip_next = False
    for k, tok in enumerate(toks):
        if tok.op is None:
            if skip_next:
                skip_next = False
                continue
            nxt = toks[k + 1] if k + 1 < len(toks) else None
            redirect = nxt is not None and nxt.op in ("<", ">", ">>", ">&", "<&")
            if tok.value.isdigit() and redirect and nxt is not None and nxt.start == tok.end:
                continue  # `2>&1`: a file descriptor number
            out[-1].append(tok)
        elif tok.op in ("<", ">", ">>", ">&", "<&"):
            skip_next = True
        else:
            out.append([])
    return [c for c in out if c]
