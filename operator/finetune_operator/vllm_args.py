"""Read and edit the command line of a vLLM OpenAI-compatible server container.

Pure functions over a container's ``command`` and ``args`` lists. Several
AdapterDeployments may share one serving Deployment (multi-LoRA): every edit here
touches only the ``--lora-modules`` entry of one adapter name and leaves every other
token exactly as it was.

vLLM parses its flags with argparse, so the rules below follow argparse: ``--flag value``
and ``--flag=value`` are the same, ``--lora-modules`` takes one or more values up to the
next flag, and when a flag is repeated the last occurrence wins.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# vLLM's defaults when the flags are absent.
DEFAULT_MAX_LORA_RANK = 16
DEFAULT_MAX_LORAS = 1
# The values vLLM accepts for --max-lora-rank (argparse choices).
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

OPENAI_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

Origin = Literal["command", "args"]


class ServerArgsError(ValueError):
    """The container's command line cannot be edited safely."""


@dataclass(frozen=True)
class LoraModule:
    """One ``--lora-modules`` value: ``name=path`` or a JSON object."""

    name: str
    path: str
    base_model_name: str | None = None
    json_form: bool = False

    def render(self) -> str:
        if self.json_form or self.base_model_name:
            obj: dict[str, str] = {"name": self.name, "path": self.path}
            if self.base_model_name:
                obj["base_model_name"] = self.base_model_name
            return json.dumps(obj, separators=(",", ":"))
        return f"{self.name}={self.path}"


@dataclass
class ServerArgs:
    """What the operator needs to know about a vLLM server's configuration."""

    is_openai_server: bool
    model: str | None = None
    served_model_names: list[str] = field(default_factory=list)
    enable_lora: bool = False
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_loras: int = DEFAULT_MAX_LORAS
    lora_modules: list[LoraModule] = field(default_factory=list)

    def module(self, name: str) -> LoraModule | None:
        for mod in self.lora_modules:
            if mod.name == name:
                return mod
        return None

    @property
    def base_model_names(self) -> list[str]:
        """Names the base model answers to: the served names, else the model itself."""
        if self.served_model_names:
            return list(self.served_model_names)
        return [self.model] if self.model else []


# ------------------------------------------------------------------ parsing


def parse_lora_module(value: str) -> LoraModule:
    """Parse one ``--lora-modules`` value in either form vLLM accepts."""
    text = value.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServerArgsError(f"--lora-modules: invalid JSON entry {value!r}: {exc}") from exc
        if not isinstance(obj, dict) or "name" not in obj or "path" not in obj:
            raise ServerArgsError(
                f"--lora-modules: JSON entry {value!r} needs 'name' and 'path' keys"
            )
        base = obj.get("base_model_name")
        return LoraModule(str(obj["name"]), str(obj["path"]), str(base) if base else None, True)
    if "=" not in text:
        raise ServerArgsError(f"--lora-modules: entry {value!r} is not name=path or JSON")
    name, path = text.split("=", 1)
    return LoraModule(name, path)


def _is_flag(token: str) -> bool:
    if not token.startswith("-") or len(token) < 2:
        return False
    try:
        float(token)  # a negative number is a value, not a flag
    except ValueError:
        return True
    return False


def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


def _server_start(tokens: Sequence[str]) -> int | None:
    """Index of the first token after the server entry point, or None when not vLLM."""
    for i, tok in enumerate(tokens):
        base = tok.rsplit("/", 1)[-1]
        if base == "vllm" and i + 1 < len(tokens) and tokens[i + 1] == "serve":
            return i + 2
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == OPENAI_SERVER_MODULE:
            return i + 2
        if tok == f"-m{OPENAI_SERVER_MODULE}":
            return i + 1
    return None


@dataclass(frozen=True)
class _Occurrence:
    flag: str
    index: int  # index of the flag token
    values: tuple[str, ...]
    end: int  # index after the last value
    inline: bool  # --flag=value form


def _occurrences(tokens: Sequence[str], start: int, multi: set[str]) -> list[_Occurrence]:
    """Every flag occurrence after ``start`` with the values argparse would give it."""
    found: list[_Occurrence] = []
    i = start
    while i < len(tokens):
        tok = tokens[i]
        if not _is_flag(tok):
            i += 1
            continue
        name = _flag_name(tok)
        if "=" in tok:
            found.append(_Occurrence(name, i, (tok.split("=", 1)[1],), i + 1, True))
            i += 1
            continue
        j = i + 1
        if name in multi:
            while j < len(tokens) and not _is_flag(tokens[j]):
                j += 1
        elif j < len(tokens) and not _is_flag(tokens[j]):
            j += 1
        found.append(_Occurrence(name, i, tuple(tokens[i + 1 : j]), j, False))
        i = j
    return found


_MULTI = {"--lora-modules", "--served-model-name"}
_BOOL = {"--enable-lora", "--no-enable-lora"}


def _positional_model(tokens: Sequence[str], start: int) -> str | None:
    """``vllm serve <model>``: the first bare token after ``serve``."""
    i = start
    while i < len(tokens):
        tok = tokens[i]
        if _is_flag(tok):
            name = _flag_name(tok)
            if "=" in tok or name in _BOOL:
                i += 1
            elif name in _MULTI:
                i += 1
                while i < len(tokens) and not _is_flag(tokens[i]):
                    i += 1
            else:
                i += 2
            continue
        return tok
    return None


def _last(occ: list[_Occurrence], *names: str) -> _Occurrence | None:
    hits = [o for o in occ if o.flag in names]
    return hits[-1] if hits else None


def _int_flag(occ: list[_Occurrence], name: str, default: int) -> int:
    hit = _last(occ, name)
    if hit is None or not hit.values:
        return default
    try:
        return int(hit.values[0])
    except ValueError as exc:
        raise ServerArgsError(f"{name}: {hit.values[0]!r} is not an integer") from exc


def split_tokens(container: dict[str, Any]) -> list[str]:
    return [str(t) for t in (container.get("command") or [])] + [
        str(t) for t in (container.get("args") or [])
    ]


def parse_container(container: dict[str, Any]) -> ServerArgs:
    """Parse a container spec (``command`` + ``args``) into :class:`ServerArgs`."""
    return parse_tokens(split_tokens(container))


def parse_tokens(tokens: Sequence[str]) -> ServerArgs:
    start = _server_start(tokens)
    if start is None:
        return ServerArgs(is_openai_server=False)
    occ = _occurrences(tokens, start, _MULTI)
    model_flag = _last(occ, "--model")
    model = model_flag.values[0] if model_flag and model_flag.values else None
    if model is None:
        model = _positional_model(tokens, start)
    served = _last(occ, "--served-model-name")
    enable = _last(occ, *_BOOL)
    enable_lora = False
    if enable is not None:
        if enable.flag == "--no-enable-lora":
            enable_lora = False
        elif enable.inline:
            enable_lora = enable.values[0].lower() in ("1", "true", "yes")
        else:
            enable_lora = True
    lora = _last(occ, "--lora-modules")
    modules = [parse_lora_module(v) for v in lora.values] if lora else []
    return ServerArgs(
        is_openai_server=True,
        model=model,
        served_model_names=list(served.values) if served else [],
        enable_lora=enable_lora,
        max_lora_rank=_int_flag(occ, "--max-lora-rank", DEFAULT_MAX_LORA_RANK),
        max_loras=_int_flag(occ, "--max-loras", DEFAULT_MAX_LORAS),
        lora_modules=modules,
    )


# ------------------------------------------------------------------ editing


def _split_back(tokens: list[tuple[str, Origin]]) -> tuple[list[str], list[str]]:
    command = [t for t, o in tokens if o == "command"]
    args = [t for t, o in tokens if o == "args"]
    return command, args


def _tagged(container: dict[str, Any]) -> list[tuple[str, Origin]]:
    cmd: list[tuple[str, Origin]] = [(str(t), "command") for t in container.get("command") or []]
    args: list[tuple[str, Origin]] = [(str(t), "args") for t in container.get("args") or []]
    return cmd + args


def _apply(container: dict[str, Any], tagged: list[tuple[str, Origin]]) -> dict[str, Any]:
    command, args = _split_back(tagged)
    out = dict(container)
    if container.get("command") is not None or command:
        out["command"] = command
    out["args"] = args
    return out


def _set_flag_value(
    tagged: list[tuple[str, Origin]], start: int, flag: str, value: str
) -> list[tuple[str, Origin]]:
    """Set a single-valued flag: replace its last occurrence, or append it."""
    tokens = [t for t, _ in tagged]
    hit = _last(_occurrences(tokens, start, _MULTI), flag)
    out = list(tagged)
    if hit is None:
        return [*out, (flag, "args"), (value, "args")]
    origin = out[hit.index][1]
    if hit.inline:
        out[hit.index] = (f"{flag}={value}", origin)
    elif hit.values:
        out[hit.index + 1] = (value, out[hit.index + 1][1])
    else:
        out.insert(hit.index + 1, (value, origin))
    return out


def _replace_lora_values(
    tagged: list[tuple[str, Origin]], start: int, values: list[str]
) -> list[tuple[str, Origin]]:
    """Rewrite the effective ``--lora-modules`` occurrence with ``values``."""
    tokens = [t for t, _ in tagged]
    hit = _last(_occurrences(tokens, start, _MULTI), "--lora-modules")
    out = list(tagged)
    if hit is None:
        if not values:
            return out
        return [*out, ("--lora-modules", "args"), *[(v, "args") for v in values]]
    origin = out[hit.index][1]
    if not values:
        return out[: hit.index] + out[hit.end :]
    replacement = [("--lora-modules", origin), *[(v, origin) for v in values]]
    return out[: hit.index] + replacement + out[hit.end :]


def _require_server(container: dict[str, Any]) -> int:
    start = _server_start(split_tokens(container))
    if start is None:
        raise ServerArgsError(
            "container does not run the vLLM OpenAI server "
            "(expected 'vllm serve <model>' or 'python -m vllm.entrypoints.openai.api_server')"
        )
    return start


def set_lora_module(container: dict[str, Any], module: LoraModule) -> dict[str, Any]:
    """Return the container with this adapter's entry added or replaced; others untouched."""
    start = _require_server(container)
    tagged = _tagged(container)
    current = parse_container(container).lora_modules
    values: list[str] = []
    replaced = False
    for mod in current:
        if mod.name == module.name:
            values.append(module.render())
            replaced = True
        else:
            values.append(_original_value(container, mod))
    if not replaced:
        values.append(module.render())
    return _apply(container, _replace_lora_values(tagged, start, values))


def remove_lora_module(container: dict[str, Any], name: str) -> dict[str, Any]:
    """Return the container without this adapter's entry; others untouched."""
    start = _require_server(container)
    current = parse_container(container).lora_modules
    if all(mod.name != name for mod in current):
        return dict(container)
    values = [_original_value(container, mod) for mod in current if mod.name != name]
    return _apply(container, _replace_lora_values(_tagged(container), start, values))


def _original_value(container: dict[str, Any], module: LoraModule) -> str:
    """The exact token another adapter's entry was written as (kept byte for byte)."""
    tokens = split_tokens(container)
    start = _server_start(tokens) or 0
    hit = _last(_occurrences(tokens, start, _MULTI), "--lora-modules")
    for value in hit.values if hit else ():
        if parse_lora_module(value).name == module.name:
            return value
    return module.render()


def ensure_enable_lora(container: dict[str, Any]) -> dict[str, Any]:
    """Return the container with ``--enable-lora`` on."""
    start = _require_server(container)
    if parse_container(container).enable_lora:
        return dict(container)
    tagged = [(t, o) for t, o in _tagged(container) if _flag_name(t) not in ("--no-enable-lora",)]
    tokens = [t for t, _ in tagged]
    hit = _last(_occurrences(tokens, start, _MULTI), "--enable-lora")
    if hit is not None and hit.inline:
        tagged[hit.index] = ("--enable-lora", tagged[hit.index][1])
        return _apply(container, tagged)
    return _apply(container, [*tagged, ("--enable-lora", "args")])


def set_max_lora_rank(container: dict[str, Any], rank: int) -> dict[str, Any]:
    start = _require_server(container)
    return _apply(
        container, _set_flag_value(_tagged(container), start, "--max-lora-rank", str(rank))
    )


def set_max_loras(container: dict[str, Any], count: int) -> dict[str, Any]:
    start = _require_server(container)
    return _apply(container, _set_flag_value(_tagged(container), start, "--max-loras", str(count)))


def rank_setting_for(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    for allowed in ALLOWED_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ServerArgsError(
        f"rank {rank} is above the largest --max-lora-rank vLLM accepts "
        f"({ALLOWED_MAX_LORA_RANKS[-1]}): retrain with a smaller lora.r"
    )


# ------------------------------------------------------------------ base models

_HF_REV = re.compile(r"@[^/]*$")


def normalize_model_name(name: str) -> str:
    """Compare-friendly form of a model reference: no scheme, revision or trailing slash."""
    text = name.strip()
    for scheme in ("hf://", "pvc://", "s3://", "file://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    text = _HF_REV.sub("", text).rstrip("/")
    return text.lower()


def same_base_model(adapter_base: str, server_names: Sequence[str]) -> bool | None:
    """Whether the adapter's base model is the one the server runs.

    ``None`` when it cannot be told (no names). Full names are compared first; a model
    served from a volume (``/models/Llama-3-8B``) matches ``hf://org/Llama-3-8B`` by its
    last path segment.
    """
    if not adapter_base or not server_names:
        return None
    want = normalize_model_name(adapter_base)
    want_leaf = want.rsplit("/", 1)[-1]
    for served in server_names:
        have = normalize_model_name(served)
        if have == want or have.rsplit("/", 1)[-1] == want_leaf:
            return True
    return False
