"""The data step: load rows, detect their format, validate, clean, template, tokenize, split.

Everything here runs before the model is loaded, so bad data fails in seconds with a message
that says what to change. Only the tokenizer of the base model is needed (for the chat
template and for token lengths).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

from finetune_operator.api.finetunejob import Cleaning, DatasetSpec

from .errors import data_not_found, data_unusable, model_not_found
from .pii import mask_text

log = logging.getLogger(__name__)

# Columns each format needs (the error for undetectable data lists them).
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # format: (required columns, optional columns)
    "prompt-completion": (("prompt", "completion"), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "messages": (("messages",), ()),
}
ROLES = {"system", "user", "assistant", "tool"}
DEFAULT_EVAL_SPLIT = 0.1
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

# Size and shape bounds, checked before a row is templated or tokenized (decision 1610).
# No tokenizer in use packs anywhere near this many characters (or JSON bytes) into one
# token, so text longer than maxTokens times this cannot fit and is dropped untokenized.
MAX_BYTES_PER_TOKEN = 64
# A JSONL line may also carry columns that are never tokenized (ids, metadata).
LINE_ALLOWANCE_BYTES = 1 << 20
# Rows are a few levels deep (row -> messages -> message; a JSON schema a few more).
MAX_JSON_DEPTH = 64
# Drop reasons that have their own limit and do not count towards maxDroppedShare.
SHARE_EXEMPT_REASONS = frozenset({"duplicate", "overlapsTrain"})

# Used when neither the base model nor the spec provides a chat template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


# ------------------------------------------------------------------ row model


@dataclass
class Example:
    """One training example, whatever format it came in."""

    prompt_messages: list[dict[str, str]]
    completion: str
    task: str | None = None
    json_schema: dict[str, Any] | None = None
    must_refuse: bool = False

    def content_key(self) -> str:
        """sha256 of the normalised content (case and whitespace folded) for dedup."""
        parts = [f"{m['role']}:{_normalise(m['content'])}" for m in self.prompt_messages]
        parts.append(f"assistant:{_normalise(self.completion)}")
        return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()


@dataclass
class TokenizedExample:
    example: Example
    prompt_text: str
    completion_text: str
    input_ids: list[int]
    labels: list[int]
    completion_tokens: int


@dataclass
class DataReport:
    rows_read: int = 0
    rows_kept: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    duplicates: int = 0
    duplicate_rate: float = 0.0
    pii_masked: int = 0
    pii_by_kind: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    token_length_percentiles: dict[str, int] = field(default_factory=dict)
    digest: str = ""
    format: str = ""
    eval_source: str = "split"
    eval_rows_read: int | None = None
    eval_dropped: dict[str, int] = field(default_factory=dict)
    chat_template: str = "model"
    warnings: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        """camelCase dict for data_report.json and the progress channel."""
        out: dict[str, Any] = {
            "rowsRead": self.rows_read,
            "rowsKept": self.rows_kept,
            "trainRows": self.train_rows,
            "evalRows": self.eval_rows,
            "duplicates": self.duplicates,
            "duplicateRate": round(self.duplicate_rate, 6),
            "piiMasked": self.pii_masked,
            "piiByKind": dict(self.pii_by_kind),
            "dropped": dict(self.dropped),
            "tokenLengthPercentiles": dict(self.token_length_percentiles),
            "digest": self.digest,
            "format": self.format,
            "evalSource": self.eval_source,
            "chatTemplate": self.chat_template,
        }
        if self.eval_rows_read is not None:
            out["evalRowsRead"] = self.eval_rows_read
            out["evalDropped"] = dict(self.eval_dropped)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    report: DataReport
    chat_template: str


# ------------------------------------------------------------------ reading


def max_line_bytes(max_tokens: int) -> int:
    """The longest JSONL line read in full; longer lines are skipped and counted ``tooLarge``."""
    return max_tokens * MAX_BYTES_PER_TOKEN + LINE_ALLOWANCE_BYTES


def read_records(
    path: str | Path, line_limit: int | None = None
) -> tuple[list[object], Counter[str]]:
    """Rows of a JSONL/JSON/Parquet file, a folder of them, or a ``save_to_disk`` folder.

    Returns the rows and the lines dropped while reading, by reason (``invalidJson``,
    ``tooLarge``: a line above ``line_limit`` bytes, ``tooDeep``: nested above MAX_JSON_DEPTH).
    """
    p = Path(path)
    if not p.exists():
        raise data_not_found(
            f"data path {p} does not exist: check dataset uri / paths and that the volume is mounted"
        )
    if p.is_dir():
        if any((p / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
            _refuse_special_files(p)
            return _read_saved_dataset(p), Counter()
        # Not is_file(): a FIFO or device named *.jsonl must be refused, not skipped.
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in DATA_SUFFIXES)
        files = [f for f in files if not f.is_dir()]
        if not files:
            raise data_not_found(
                f"data folder {p} has no {', '.join(DATA_SUFFIXES)} files and is not a datasets "
                "save_to_disk folder: point the dataset at a data file or a folder of them"
            )
        rows: list[object] = []
        dropped: Counter[str] = Counter()
        for f in files:
            r, d = _read_file(f, line_limit)
            rows.extend(r)
            dropped.update(d)
        return rows, dropped
    return _read_file(p, line_limit)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _not_regular(p: Path, mode: int) -> Exception:
    return data_unusable(
        f"{p} is {_file_kind(mode)}, not a regular file: data files must be regular files "
        "(copy the data into a file instead of streaming it through a pipe or device)"
    )


def open_regular(p: Path) -> BinaryIO:
    """Open ``p`` for reading only if it is a regular file.

    Opened non-blocking, so a FIFO is refused at once instead of waiting for a writer; the
    check is on the open descriptor, so the path cannot be swapped between check and read.
    """
    try:
        mode = p.stat().st_mode
        if not stat.S_ISREG(mode):  # a socket cannot even be opened: name what it is
            raise _not_regular(p, mode)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise data_unusable(f"{p}: cannot open the data file: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(p, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_special_files(folder: Path) -> None:
    for f in folder.rglob("*"):
        mode = f.stat().st_mode if f.exists() else 0
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _not_regular(f, mode)


def _read_file(p: Path, line_limit: int | None = None) -> tuple[list[object], Counter[str]]:
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p, line_limit)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        return _read_parquet(p), Counter()
    raise data_unusable(
        f"{p}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .parquet or a "
        "datasets save_to_disk folder"
    )


def _decode_line(p: Path, raw: bytes, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise data_unusable(
            f"{p}: line {line_no} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
            f"{exc.start + 1}); re-save the file as UTF-8"
        ) from exc


def bounded_lines(f: BinaryIO, limit: int | None) -> Iterator[bytes | None]:
    """Each line of ``f``; ``None`` for a line longer than ``limit`` bytes, which is skipped
    in 1 MiB pieces and never held whole."""
    while True:
        raw = f.readline(-1 if limit is None else limit + 1)
        if not raw:
            return
        if limit is None or len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        while (piece := f.readline(1 << 20)) and not piece.endswith(b"\n"):
            pass
        yield None


_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit`` (strings skipped).

    A line with no more than ``limit`` brackets cannot, so most lines cost one count.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for m in _STRING_OR_BRACKET.finditer(raw):
        c = raw[m.start()]
        if c in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif c in b"]}":
            depth -= 1
    return False


def value_too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed value nests lists/dicts deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > limit:
                return True
            children = v.values() if isinstance(v, dict) else v
            stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _parse_line(raw: bytes, p: Path, line_no: int) -> object:
    """One JSONL line as a value; raises RowRejected (tooDeep) or ValueError (invalid JSON)."""
    if nesting_exceeds(raw, MAX_JSON_DEPTH):
        raise RowRejected("tooDeep")
    try:
        return json.loads(_decode_line(p, raw, line_no))
    except RecursionError as exc:  # not reached after the check above; never let it escape
        raise RowRejected("tooDeep") from exc


def _read_jsonl(p: Path, line_limit: int | None = None) -> tuple[list[object], Counter[str]]:
    rows: list[object] = []
    bad_lines: list[str] = []
    dropped: Counter[str] = Counter()
    with open_regular(p) as f:
        for line_no, raw in enumerate(bounded_lines(f, line_limit), start=1):
            if raw is None:
                dropped["tooLarge"] += 1
                continue
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # some editors start a UTF-8 file with one
            if not raw.strip():
                continue
            try:
                rows.append(_parse_line(raw, p, line_no))
            except RowRejected as rej:
                dropped[rej.reason] += 1
            except json.JSONDecodeError as exc:
                bad_lines.append(f"line {line_no} ({exc.msg} at column {exc.colno})")
    _log_dropped_lines(p, dropped, line_limit)
    if bad_lines:
        # Invalid lines are dropped and counted; say which ones so they can be fixed.
        shown = "; ".join(bad_lines[:5]) + (
            f"; and {len(bad_lines) - 5} more" if len(bad_lines) > 5 else ""
        )
        if not rows and not dropped:
            raise data_unusable(
                f"{p}: no line is valid JSON ({shown}); each line must be one JSON object"
            )
        log.warning("%s: %d invalid JSON line(s) dropped: %s", p, len(bad_lines), shown)
        dropped["invalidJson"] = len(bad_lines)
    return rows, dropped


def _log_dropped_lines(p: Path, dropped: Counter[str], line_limit: int | None) -> None:
    if dropped["tooLarge"]:
        log.warning(
            "%s: %d line(s) longer than %d bytes dropped unread (tooLarge): such a row cannot "
            "fit training.maxSeqLength",
            p,
            dropped["tooLarge"],
            line_limit,
        )
    if dropped["tooDeep"]:
        log.warning(
            "%s: %d line(s) nested deeper than %d levels dropped (tooDeep)",
            p,
            dropped["tooDeep"],
            MAX_JSON_DEPTH,
        )


def _read_json(p: Path) -> tuple[list[object], Counter[str]]:
    with open_regular(p) as f:
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise data_unusable(
            f"{p}: not valid UTF-8 (byte offset {exc.start}); re-save the file as UTF-8"
        ) from exc
    except json.JSONDecodeError as exc:
        raise data_unusable(
            f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}); a .json file must hold a list "
            "of row objects (use .jsonl for one object per line)"
        ) from exc
    except RecursionError as exc:
        raise data_unusable(
            f"{p}: JSON nested too deeply to read; rows are objects a few levels deep "
            f"(at most {MAX_JSON_DEPTH})"
        ) from exc
    if not isinstance(doc, list):
        raise data_unusable(
            f"{p}: expected a JSON list of row objects, found a {type(doc).__name__}; "
            "wrap the rows in [...] or use .jsonl"
        )
    rows = [r for r in doc if not value_too_deep(r)]
    dropped: Counter[str] = Counter()
    if len(rows) < len(doc):
        dropped["tooDeep"] = len(doc) - len(rows)
        _log_dropped_lines(p, dropped, None)
    return rows, dropped


def _read_parquet(p: Path) -> list[object]:
    import pyarrow.parquet as pq

    with open_regular(p) as f:
        try:
            rows: list[object] = pq.read_table(f).to_pylist()
        except Exception as exc:
            raise data_unusable(f"{p}: cannot read Parquet: {exc}") from exc
    return rows


def _read_saved_dataset(p: Path) -> list[object]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as exc:
        raise data_unusable(f"{p}: cannot load the save_to_disk folder: {exc}") from exc
    if isinstance(ds, DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise data_unusable(
                f"{p}: DatasetDict with splits {sorted(ds)} and no 'train' split; save the split "
                "to train on, or name it train"
            )
    assert isinstance(ds, Dataset)
    return list(ds.to_list())


# ------------------------------------------------------------------ formats


def _columns(records: list[object], sample: int = 200) -> list[str]:
    seen: dict[str, None] = {}
    for r in records[:sample]:
        if isinstance(r, dict):
            for k in r:
                seen.setdefault(str(k), None)
    return list(seen)


def _format_help() -> str:
    parts = []
    for name, (req, opt) in FORMAT_COLUMNS.items():
        cols = " + ".join(req) + (f" (optional: {', '.join(opt)})" if opt else "")
        parts.append(f"{name}: {cols}")
    return "; ".join(parts)


def detect_format(records: list[object], requested: str) -> str:
    """The row format: the requested one (checked) or, for ``auto``, the one whose columns fit."""
    columns = set(_columns(records))
    found = ", ".join(sorted(columns)) or "(none)"
    if requested != "auto":
        required = FORMAT_COLUMNS[requested][0]
        missing = [c for c in required if c not in columns]
        if missing:
            raise data_unusable(
                f"format {requested} needs columns {', '.join(required)} but {', '.join(missing)} "
                f"missing; columns found: {found}. Fix the data or set dataset.format "
                f"(expected columns per format: {_format_help()})"
            )
        return requested
    # The format most rows fit (the first listed on a tie); rows of another format are
    # dropped as otherFormat and reported, not silently lost to a type check.
    fits = format_counts(records)
    best = max(FORMAT_COLUMNS, key=lambda name: fits[name])
    if fits[best]:
        return best
    raise data_unusable(
        f"cannot detect the data format: columns found: {found}. Expected columns per format: "
        f"{_format_help()}. Rename the columns or set dataset.format"
    )


def fitting_formats(row: dict[str, object]) -> list[str]:
    """The formats whose required columns the row has."""
    return [
        name for name, (required, _opt) in FORMAT_COLUMNS.items() if all(c in row for c in required)
    ]


def format_counts(records: list[object]) -> Counter[str]:
    """How many rows have the required columns of each format."""
    fits: Counter[str] = Counter()
    for r in records:
        if isinstance(r, dict):
            fits.update(fitting_formats(r))
    return fits


class RowRejected(Exception):
    """A row that cannot become an example; ``reason`` is the drop-reason key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise RowRejected("invalidType")
    return value


def _message_list(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowRejected("invalidType" if not isinstance(value, list) else "empty")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RowRejected("invalidMessages")
        out.append({"role": str(m["role"]), "content": _text(m.get("content"))})
    return out


def _conversation_or_text(value: object, role: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return _message_list(value)
    return [{"role": role, "content": _text(value)}]


def row_to_example(row: object, fmt: str) -> Example:
    """Normalise one row of a known format; raises ``RowRejected`` with the drop reason."""
    if not isinstance(row, dict):
        raise RowRejected("invalidRow")
    if any(c not in row for c in FORMAT_COLUMNS[fmt][0]):
        others = fitting_formats(row)
        if others:
            raise RowRejected("otherFormat", others[0])
    if fmt == "prompt-completion":
        prompt = _conversation_or_text(row.get("prompt"), "user")
        answer = _conversation_or_text(row.get("completion"), "assistant")
        if answer[-1]["role"] != "assistant":
            raise RowRejected("invalidMessages")
        completion = answer[-1]["content"]
    elif fmt == "instruction":
        instruction = _text(row.get("instruction"))
        extra = row.get("input")
        extra_text = "" if extra is None else _text(extra)
        user = instruction if not extra_text.strip() else f"{instruction}\n\n{extra_text}"
        prompt = [{"role": "user", "content": user}]
        completion = _text(row.get("output"))
    else:
        messages = _message_list(row.get("messages"))
        if messages[-1]["role"] != "assistant":
            raise RowRejected("noFinalAssistantMessage")
        prompt, completion = messages[:-1], messages[-1]["content"]
    if not prompt or not any(m["content"].strip() for m in prompt) or not completion.strip():
        raise RowRejected("empty")
    return Example(prompt, completion, *_extras(row))


def _extras(row: dict[str, object]) -> tuple[str | None, dict[str, Any] | None, bool]:
    task = row.get("task")
    schema = row.get("json_schema", row.get("jsonSchema"))
    if isinstance(schema, str) and schema.strip():
        if nesting_exceeds(schema.encode(), MAX_JSON_DEPTH):
            raise RowRejected("tooDeep")
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise RowRejected("invalidJsonSchema") from exc
    if schema is not None and not isinstance(schema, dict):
        schema = None
    refuse = row.get("must_refuse", row.get("mustRefuse", False))
    return (str(task) if task else None), schema, bool(refuse)


# ------------------------------------------------------------------ cleaning


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def mask_example(example: Example, kinds: Iterable[str]) -> Counter[str]:
    """Mask personal data in place in every message and the completion; returns counts."""
    kinds = list(kinds)
    total: Counter[str] = Counter()
    for m in example.prompt_messages:
        m["content"], c = mask_text(m["content"], kinds)
        total.update(c)
    example.completion, c = mask_text(example.completion, kinds)
    total.update(c)
    return total


def example_chars(ex: Example) -> int:
    """Characters of text the example puts through the chat template."""
    return sum(len(m["content"]) for m in ex.prompt_messages) + len(ex.completion)


@dataclass
class CleanResult:
    examples: list[Example]
    rows_read: int
    dropped: Counter[str]
    duplicates: int
    pii: Counter[str]
    keys: list[str]
    # otherFormat rows by the format they fit instead
    other_formats: Counter[str] = field(default_factory=Counter)


def clean_rows(
    records: list[object],
    fmt: str,
    cleaning: Cleaning,
    read_dropped: Counter[str] | None = None,
    max_chars: int | None = None,
) -> CleanResult:
    """Validate, size-check, mask and dedup rows; every dropped row is counted by reason.

    ``read_dropped``: lines the reader already dropped (counted as read). A row with more
    than ``max_chars`` characters of text is dropped as ``tooLong`` before it is masked,
    templated or tokenized.
    """
    dropped: Counter[str] = Counter(read_dropped or {})
    other_formats: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[Example] = []
    keys: list[str] = []
    duplicates = 0
    for row in records:
        try:
            ex = row_to_example(row, fmt)
        except RowRejected as rej:
            dropped[rej.reason] += 1
            if rej.reason == "otherFormat":
                other_formats[rej.detail] += 1
            continue
        if max_chars is not None and example_chars(ex) > max_chars:
            dropped["tooLong"] += 1
            continue
        if cleaning.pii_mask.enabled and cleaning.pii_mask.kinds:
            pii.update(mask_example(ex, cleaning.pii_mask.kinds))
        key = ex.content_key()
        if key in seen:
            duplicates += 1
            if cleaning.dedup:
                dropped["duplicate"] += 1
                continue
        seen.add(key)
        kept.append(ex)
        keys.append(key)
    rows_read = len(records) + sum((read_dropped or Counter()).values())
    return CleanResult(kept, rows_read, dropped, duplicates, pii, keys, other_formats)


# ------------------------------------------------------------------ templating


def load_tokenizer(
    model_dir: str | Path, chat_template: str | None = None
) -> tuple[PreTrainedTokenizerBase, str]:
    """The base model's tokenizer with the chat template in force, and where it came from."""
    from transformers import AutoTokenizer

    p = Path(model_dir)
    if not p.is_dir():
        raise model_not_found(
            f"base model folder {p} not found: check baseModel.uri and that the model was fetched"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:
        raise model_not_found(f"cannot load the tokenizer from {p}: {exc}") from exc
    source = "model"
    if chat_template:
        tok.chat_template = chat_template
        source = "spec"
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
        source = "fallback"
        log.warning("the base model has no chat template; using a plain '### Role:' template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, source


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The templated prompt ending with the generation prompt (what the model sees at inference)."""
    # With tokenize=False the template gives text.
    return cast(
        str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str, limit: int | None) -> list[int]:
    if limit is None:
        ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)[
            "input_ids"
        ]
    return ids


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, ex: Example, completion_only: bool, limit: int | None = None
) -> TokenizedExample:
    """Template one example and build input_ids/labels (prompt tokens masked when asked).

    With ``limit``, no token list grows past ``limit`` tokens: pass one more than the
    longest sequence kept, so a truncated row is still recognised as too long.
    """
    prompt_text = render_prompt(tokenizer, ex.prompt_messages)
    full = cast(
        str,
        tokenizer.apply_chat_template(
            [*ex.prompt_messages, {"role": "assistant", "content": ex.completion}], tokenize=False
        ),
    )
    completion_text = full[len(prompt_text) :] if full.startswith(prompt_text) else ex.completion
    eos = tokenizer.eos_token or ""
    if eos and eos not in completion_text:
        completion_text += eos
    prompt_ids = _token_ids(tokenizer, prompt_text, limit)
    ids = _token_ids(tokenizer, prompt_text + completion_text, limit)
    # Tokens may merge across the boundary: the completion starts where the two diverge.
    n = 0
    while n < min(len(prompt_ids), len(ids)) and prompt_ids[n] == ids[n]:
        n += 1
    labels = [-100] * n + ids[n:] if completion_only else list(ids)
    answer_tokens = len(_token_ids(tokenizer, ex.completion, limit))
    return TokenizedExample(ex, prompt_text, completion_text, ids, labels, answer_tokens)


def percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99/max of token lengths."""
    if not lengths:
        return {}
    s = sorted(lengths)

    def rank(q: float) -> int:
        return s[max(0, math.ceil(q * len(s)) - 1)]

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": s[-1]}


def filter_by_length(
    tokenized: list[TokenizedExample], min_tokens: int, max_tokens: int, dropped: Counter[str]
) -> list[TokenizedExample]:
    """Drop rows whose answer text has fewer than min_tokens tokens or whose templated
    sequence (prompt + answer) has more than max_tokens."""
    kept = []
    for t in tokenized:
        if t.completion_tokens < min_tokens:
            dropped["tooShort"] += 1
        elif len(t.input_ids) > max_tokens:
            dropped["tooLong"] += 1
        else:
            kept.append(t)
    return kept


# ------------------------------------------------------------------ split, digest


def split_indices(keys: list[str], eval_share: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split: rank rows by sha256(seed, content) and hold out the first.

    Depends only on the seed and each row's content, not on row order.
    """
    if len(keys) < 2:
        return list(range(len(keys))), []
    n_eval = min(len(keys) - 1, max(1, round(len(keys) * eval_share)))
    # Repeated keys (dedup off) are told apart by occurrence number, not by position.
    occurrence: Counter[str] = Counter()
    ranks = []
    for k in keys:
        ranks.append(hashlib.sha256(f"{seed}:{k}:{occurrence[k]}".encode()).hexdigest())
        occurrence[k] += 1
    ranked = sorted(range(len(keys)), key=lambda i: ranks[i])
    held = set(ranked[:n_eval])
    train = [i for i in range(len(keys)) if i not in held]
    return train, sorted(held)


def data_digest(train: list[TokenizedExample], eval_: list[TokenizedExample]) -> str:
    """sha256 over the cleaned, templated rows (train, then eval)."""
    h = hashlib.sha256()
    for part, rows in (("train", train), ("eval", eval_)):
        h.update(f"#{part}\n".encode())
        for t in rows:
            line = json.dumps([t.prompt_text, t.completion_text], ensure_ascii=False)
            h.update(line.encode() + b"\n")
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------ the step


def _prepare_source(
    path: str | Path,
    dataset: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    fmt: str | None,
) -> tuple[list[TokenizedExample], CleanResult, str]:
    records, read_dropped = read_records(path, max_line_bytes(max_tokens))
    if not records:
        if read_dropped:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(read_dropped.items()))
            raise data_unusable(
                f"{path}: no usable row (dropped {why}): a line must be one JSON object, at "
                f"most {MAX_JSON_DEPTH} levels deep and short enough to fit "
                "training.maxSeqLength"
            )
        raise data_unusable(f"{path}: no rows found; the data file is empty")
    fmt = fmt or detect_format(records, dataset.format)
    cleaned = clean_rows(
        records, fmt, dataset.cleaning, read_dropped, max_tokens * MAX_BYTES_PER_TOKEN
    )
    del records  # the examples hold what is needed
    # Tokens past this many cannot change a row's fate (kept, tooShort or tooLong).
    limit = max(max_tokens, dataset.cleaning.min_tokens) + 1
    tokenized = [
        tokenize_example(tokenizer, ex, dataset.completion_only, limit) for ex in cleaned.examples
    ]
    kept = filter_by_length(tokenized, dataset.cleaning.min_tokens, max_tokens, cleaned.dropped)
    return kept, cleaned, fmt


def prepare_data(
    dataset: DatasetSpec,
    train_path: str | Path,
    eval_path: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    seed: int,
    template_source: str = "model",
) -> PreparedData:
    """Run the whole data step; raises ``TrainerError`` (DataNotFound / DataUnusable)."""
    try:
        return _prepare(
            dataset, train_path, eval_path, tokenizer, max_seq_length, seed, template_source
        )
    except RecursionError as exc:  # rows are depth-checked; a data file must never crash the run
        raise data_unusable(
            f"the data is nested too deeply to process: keep rows at most {MAX_JSON_DEPTH} "
            "levels deep"
        ) from exc


def _format_warning(label: str, cleaned: CleanResult, fmt: str) -> str | None:
    n = cleaned.dropped.get("otherFormat", 0)
    if not n:
        return None
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(cleaned.other_formats.items()))
    return (
        f"{label}: {n} of {cleaned.rows_read} rows are in another format than the data's "
        f"{fmt} ({kinds}) and were dropped (otherFormat): convert them to {fmt} or train on "
        "them in a separate job"
    )


def _prepare(
    dataset: DatasetSpec,
    train_path: str | Path,
    eval_path: str | Path | None,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    seed: int,
    template_source: str,
) -> PreparedData:
    max_tokens = min(dataset.cleaning.max_tokens or max_seq_length, max_seq_length)
    train_all, cleaned, fmt = _prepare_source(train_path, dataset, tokenizer, max_tokens, None)
    report = DataReport(
        rows_read=cleaned.rows_read,
        duplicates=cleaned.duplicates,
        duplicate_rate=cleaned.duplicates / cleaned.rows_read if cleaned.rows_read else 0.0,
        pii_masked=sum(cleaned.pii.values()),
        pii_by_kind=dict(cleaned.pii),
        format=fmt,
        chat_template=template_source,
    )
    report.warnings = [w for w in [_format_warning("train", cleaned, fmt)] if w]
    if eval_path is not None:
        train = train_all
        eval_kept, eval_clean, eval_fmt = _prepare_source(
            eval_path, dataset, tokenizer, max_tokens, None
        )
        warning = _format_warning("eval", eval_clean, eval_fmt)
        if warning:
            report.warnings.append(warning)
        train_keys = {t.example.content_key() for t in train}
        overlap = [t for t in eval_kept if t.example.content_key() in train_keys]
        if overlap:
            eval_clean.dropped["overlapsTrain"] += len(overlap)
        eval_rows = [t for t in eval_kept if t.example.content_key() not in train_keys]
        report.eval_source = "file"
        report.eval_rows_read = eval_clean.rows_read
        report.eval_dropped = dict(eval_clean.dropped)
        report.pii_masked += sum(eval_clean.pii.values())
        for k, v in eval_clean.pii.items():
            report.pii_by_kind[k] = report.pii_by_kind.get(k, 0) + v
    else:
        share = dataset.eval_split if dataset.eval_split is not None else DEFAULT_EVAL_SPLIT
        keys = [t.example.content_key() for t in train_all]
        train_idx, eval_idx = split_indices(keys, share, seed)
        train = [train_all[i] for i in train_idx]
        eval_rows = [train_all[i] for i in eval_idx]
    report.dropped = dict(cleaned.dropped)
    report.rows_kept = len(train_all)
    report.train_rows = len(train)
    report.eval_rows = len(eval_rows)
    report.token_length_percentiles = percentiles([len(t.input_ids) for t in train_all])
    report.digest = data_digest(train, eval_rows)
    for warning in report.warnings:
        log.warning("%s", warning)
    return PreparedData(train, eval_rows, report, tokenizer.chat_template)


def check_usable(report: DataReport, cleaning: Cleaning) -> None:
    """Fail before training when the data cannot give a meaningful run."""
    if report.duplicate_rate > cleaning.max_duplicate_rate:
        raise data_unusable(
            f"{report.duplicates} of {report.rows_read} rows are duplicates "
            f"({report.duplicate_rate:.0%}), above dataset.cleaning.maxDuplicateRate "
            f"{cleaning.max_duplicate_rate:.0%}: deduplicate the source data or raise maxDuplicateRate"
        )
    if report.train_rows < cleaning.min_rows:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items())) or "none dropped"
        raise data_unusable(
            f"only {report.train_rows} training rows remain after cleaning (read {report.rows_read}; "
            f"dropped {why}; {report.eval_rows} held out for eval), fewer than "
            f"dataset.cleaning.minRows {cleaning.min_rows}: add data, relax the length bounds "
            "(cleaning.minTokens/maxTokens, training.maxSeqLength) or lower minRows"
        )
    _check_dropped_share("train", report.dropped, report.rows_read, report, cleaning)
    if report.eval_rows_read is not None:
        _check_dropped_share("eval", report.eval_dropped, report.eval_rows_read, report, cleaning)


def _check_dropped_share(
    source: str, dropped: dict[str, int], rows_read: int, report: DataReport, cleaning: Cleaning
) -> None:
    """Fail when more than maxDroppedShare of the rows read were dropped (duplicates and
    eval rows seen in train have their own handling and do not count)."""
    counted = {k: v for k, v in dropped.items() if k not in SHARE_EXEMPT_REASONS and v}
    n = sum(counted.values())
    if not rows_read or n / rows_read <= cleaning.max_dropped_share:
        return
    why = ", ".join(f"{k}: {v}" for k, v in sorted(counted.items()))
    mixed = [w for w in report.warnings if w.startswith(f"{source}: ")]
    if "otherFormat" in counted and mixed:
        advice = mixed[0].split(": ", 1)[1]
    else:
        advice = "fix the rows (the trainer log names invalid lines; docs/trainer.md explains each reason)"
    raise data_unusable(
        f"{n} of {rows_read} {source} rows were dropped ({n / rows_read:.0%}; {why}), above "
        f"dataset.cleaning.maxDroppedShare {cleaning.max_dropped_share:.0%}. {advice}; or raise "
        "maxDroppedShare to train on the rest"
    )


# ------------------------------------------------------------------ outputs


def eval_row(t: TokenizedExample) -> dict[str, Any]:
    """One line of eval.jsonl (the contract with the evaluator)."""
    return {
        "prompt": t.prompt_text,
        "messages": t.example.prompt_messages,
        "completion": t.example.completion,
        "task": t.example.task,
        "jsonSchema": t.example.json_schema,
        "mustRefuse": t.example.must_refuse,
    }


def iter_jsonl(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for r in rows:
        yield json.dumps(r, ensure_ascii=False) + "\n"


def write_data_outputs(prepared: PreparedData, output_dir: str | Path) -> None:
    """Write data_report.json and eval.jsonl under the output directory."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(
        json.dumps(prepared.report.to_wire(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    with (out / "eval.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(iter_jsonl(eval_row(t) for t in prepared.eval))
