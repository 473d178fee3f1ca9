"""Read and edit the command line of a vLLM OpenAI-compatible server container.

Pure functions over a container's ``command`` and ``args``. The reading imitates what
vLLM itself does with its command line (``FlexibleArgumentParser`` and argparse in vLLM
0.8.5 to 0.34):

- the entry points ``vllm serve [MODEL]``, ``python[3] -m vllm.entrypoints.openai.api_server``
  and ``python -m vllm.entrypoints.cli.main serve``, also inside a ``sh -c``/``bash -c``
  script (``exec``, ``VAR=value`` prefixes, ``export`` and ``&&`` chains), and the vLLM
  image's own entry point when a container gives only ``args`` (see
  :mod:`finetune_operator.serving.vllm_server`);
- ``--flag value`` and ``--flag=value``, underscores in flag names (``--max_lora_rank``),
  unique abbreviations (argparse), ``--no-enable-lora``/``--disable-lora``, the last
  occurrence of a flag winning;
- ``--config FILE``: the YAML file's keys come before the command line's flags, so the
  command line wins (CLI > YAML > defaults);
- how many values each flag takes, from vLLM's own parsers (:mod:`.vllm_flags`).

Several AdapterDeployments may share one serving Deployment (multi-LoRA): every edit here
touches only what it must. An edit removes every other spelling of the flag it writes (vLLM
keeps the last occurrence, so a leftover spelling would silently win or lose) and writes
``--flag value``, a form every vLLM version parses. Inside a shell script, only the words
that change are rewritten (shell-quoted); every other byte of the script stays as written.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..domain.uris import split_scheme
from . import shell_words, vllm_flags

# vLLM's defaults when the flags are absent (vllm/config/lora.py, FrontendArgs).
DEFAULT_MAX_LORA_RANK = 16
DEFAULT_MAX_LORAS = 1
DEFAULT_PORT = 8000
# The values vLLM accepts for --max-lora-rank (0.20 and later; 0.11 and older lack 1).
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ALLOWED_MAX_LORA_RANKS_UP_TO_0_11 = (8, 16, 32, 64, 128, 256, 320, 512)
# Version rules: a behaviour read from an older wheel applies up to that version; any later
# or unknown version (no version in the image tag) gets the newest behaviour read.
OLD = (0, 11)

OPENAI_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CLI_MAIN_MODULE = "vllm.entrypoints.cli.main"
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh"})
# Images whose own entry point runs the vLLM server (`vllm serve`; before that,
# `python3 -m vllm.entrypoints.openai.api_server`): a container of one that sets only
# `args` passes them to the server. fnmatch patterns on the image reference.
# The operator's default is config.OperatorConfig.vllm_image_patterns (the same list).
DEFAULT_IMAGE_PATTERNS = (
    "vllm/vllm-openai*",
    "docker.io/vllm/vllm-openai*",
    "*/vllm/vllm-openai*",
)

Origin = Literal["command", "args"]
Version = tuple[int, int]
# Reads a --config file: (YAML text, None) or (None, why it cannot be read).
ConfigReader = Callable[[str], tuple[str | None, str | None]]


class ServerArgsError(ValueError):
    """The container's command line cannot be read or edited safely."""


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
    """What vLLM's parser makes of a server command line (vLLM's defaults where unset)."""

    is_openai_server: bool
    model: str | None = None
    served_model_names: list[str] = field(default_factory=list)
    enable_lora: bool = False
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_loras: int = DEFAULT_MAX_LORAS
    lora_modules: list[LoraModule] = field(default_factory=list)
    # None: vLLM uses max_loras (a value <= 0 also means max_loras).
    max_cpu_loras: int | None = None
    port: int = DEFAULT_PORT
    port_known: bool = True  # False: --port depends on the shell or is not an integer
    port_from_config: bool = False  # the port is a `port:` of the --config file
    uds: str | None = None
    api_key_flag: bool = False  # --api-key given at all (then VLLM_API_KEY is not read)
    api_keys_given: bool = False  # --api-key with at least one non-empty value
    api_keys: list[str] = field(default_factory=list, repr=False)
    api_key_dynamic: bool = False  # --api-key holds shell expansions
    api_key_from_config: bool = False
    api_server_count: int | None = None  # --api-server-count as given
    data_parallel_size: int = 1
    data_parallel_size_local: int | None = None
    external_lb: bool = False
    hybrid_lb: bool = False
    headless: bool = False
    serve_command: bool = False  # `vllm serve` (several API servers possible), not api_server
    form: str = ""
    config_file: str | None = None
    shell_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    problems: list[str] = field(default_factory=list)

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

    @property
    def effective_max_cpu_loras(self) -> int:
        """The LRU cache size vLLM uses (``max_cpu_loras``, else ``max_loras``)."""
        if self.max_cpu_loras is None or self.max_cpu_loras <= 0:
            return self.max_loras
        return self.max_cpu_loras


# ------------------------------------------------------------------ words


@dataclass(frozen=True)
class Word:
    """One argv word and where it is written in the container spec."""

    value: str
    origin: Origin
    index: int  # index in container[origin]
    span: tuple[int, int] | None = None  # its characters inside a shell script item
    dynamic: bool = False  # holds a shell expansion: its real value is unknown


@dataclass(frozen=True)
class Located:
    """Where vLLM's own argv (after the entry point) is in a container spec."""

    form: str
    argv: tuple[Word, ...]
    serve: bool  # positional MODEL allowed (`vllm serve`); api_server ignores it
    script: Word | None = None  # the `sh -c` script item, when the server runs in a shell
    end: int | None = None  # shell: offset after the server command's last word
    env: Mapping[str, str | None] = field(default_factory=dict)  # shell assignments
    problems: tuple[str, ...] = ()


def _basename(token: str) -> str:
    return token.rsplit("/", 1)[-1]


def _entry(values: Sequence[str]) -> tuple[int, bool, str] | None:
    """(index where vLLM's argv starts, serve semantics, form) or None."""
    for i, tok in enumerate(values):
        nxt = values[i + 1] if i + 1 < len(values) else None
        if _basename(tok) == "vllm" and nxt == "serve":
            return i + 2, True, "vllm serve"
        module = nxt if tok == "-m" else tok[2:] if tok.startswith("-m") and len(tok) > 2 else None
        if module is None:
            continue
        start = i + 2 if tok == "-m" else i + 1
        if module == OPENAI_SERVER_MODULE:
            return start, False, f"python -m {OPENAI_SERVER_MODULE}"
        if module == CLI_MAIN_MODULE and start < len(values) and values[start] == "serve":
            return start + 1, True, f"python -m {CLI_MAIN_MODULE} serve"
    return None


def _tagged(container: Mapping[str, Any]) -> list[Word]:
    words = [Word(str(t), "command", i) for i, t in enumerate(container.get("command") or [])]
    return words + [Word(str(t), "args", i) for i, t in enumerate(container.get("args") or [])]


def split_tokens(container: Mapping[str, Any]) -> list[str]:
    """The container's ``command`` followed by its ``args``, as the kubelet runs them."""
    return [w.value for w in _tagged(container)]


_WRAPPERS = frozenset({"env", "tini", "dumb-init", "--", "nohup"})


def _shell_script(words: Sequence[Word]) -> Word | None:
    """The script of ``sh -c SCRIPT`` (any shell option group holding ``c``).

    Init wrappers in front (``tini --``, ``env VAR=x``, ``dumb-init``) are skipped.
    """
    k = 0
    while k < len(words) and (
        _basename(words[k].value) in _WRAPPERS or shell_words.ASSIGN.match(words[k].value)
    ):
        k += 1
    if k >= len(words) or _basename(words[k].value) not in SHELLS:
        return None
    seen_c = False
    for w in words[k + 1 :]:
        if not seen_c and w.value.startswith("-") and not w.value.startswith("--"):
            seen_c = "c" in w.value[1:]
            continue
        if seen_c:
            return w
        if not w.value.startswith("-"):
            return None  # `sh script.sh`: a file the operator cannot see
    return None


def is_vllm_image(image: str | None, patterns: Sequence[str] | None = None) -> bool:
    """Whether ``image`` matches one of the vLLM image patterns (default: the official one)."""
    if not image:
        return False
    pats = DEFAULT_IMAGE_PATTERNS if patterns is None else patterns
    return any(fnmatch.fnmatchcase(image, p) for p in pats)


_TAG_VERSION = re.compile(r":v?(\d+)\.(\d+)(?:\.\d+)?(?:[-.+@]|$)")


def image_version(image: str | None) -> Version | None:
    """vLLM's (major, minor) from an image tag such as ``vllm/vllm-openai:v0.11.0``."""
    if not image:
        return None
    m = _TAG_VERSION.search(image.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


def locate(
    container: Mapping[str, Any], *, image_patterns: Sequence[str] | None = None
) -> Located | None:
    """Find vLLM's argv in ``command``/``args``; None when the container does not run it.

    A container whose image matches ``image_patterns`` (the vLLM image) and that sets no
    ``command`` passes ``args`` straight to the image's entry point, the server.
    """
    image_entrypoint = is_vllm_image(container.get("image"), image_patterns)
    words = _tagged(container)
    script = _shell_script(words)
    if script is not None:
        return _locate_in_script(script)
    found = _entry([w.value for w in words])
    if found is not None:
        start, serve, form = found
        return Located(form, tuple(words[start:]), serve)
    if image_entrypoint and not container.get("command"):
        return Located("image entrypoint", tuple(words), True)
    return None


# ------------------------------------------------------------------ shell scripts


def _locate_in_script(script: Word) -> Located | None:
    try:
        toks = shell_words.lex(script.value)
    except shell_words.ShellSyntaxError as exc:
        return Located("sh -c", (), True, script, problems=(f"shell script: {exc}",))
    exported: dict[str, str | None] = {}
    found: list[Located] = []
    for cmd in shell_words.commands(toks):
        env = dict(exported)
        k = 0
        while k < len(cmd) and (
            shell_words.ASSIGN.match(cmd[k].value)
            or cmd[k].value in ("exec", "env", "nohup", "command")
        ):
            if shell_words.ASSIGN.match(cmd[k].value):
                name, value = cmd[k].value.split("=", 1)
                env[name] = None if cmd[k].dynamic else value
            k += 1
        rest = cmd[k:]
        if rest and rest[0].value == "export":
            for tok in rest[1:]:
                if shell_words.ASSIGN.match(tok.value):
                    name, value = tok.value.split("=", 1)
                    exported[name] = None if tok.dynamic else value
            continue
        hit = _entry([t.value for t in rest])
        if hit is None:
            continue
        start, serve, form = hit
        argv = tuple(
            Word(t.value, script.origin, script.index, (t.start, t.end), t.dynamic)
            for t in rest[start:]
        )
        found.append(Located(f"{form} in sh -c", argv, serve, script, rest[-1].end, env))
    if not found:
        return None
    if len(found) > 1:
        first = found[0]
        return Located(
            first.form,
            first.argv,
            first.serve,
            first.script,
            first.end,
            first.env,
            ("the shell script starts vLLM more than once: the operator reads the first",),
        )
    return found[0]


# ------------------------------------------------------------------ parsing


def parse_lora_module(value: str) -> LoraModule:
    """Parse one ``--lora-modules`` value the way vLLM's ``LoRAParserAction`` does.

    ``name=path`` when the value holds ``=`` and no ``,``; anything else is JSON.
    """
    text = value.strip()
    if "=" in text and "," not in text:
        name, path = text.split("=", 1)
        return LoraModule(name, path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServerArgsError(
            f"--lora-modules: entry {clip(value)!r} is not name=path or JSON ({exc.msg})"
        ) from exc
    if not isinstance(obj, dict) or "name" not in obj or "path" not in obj:
        raise ServerArgsError(
            f"--lora-modules: JSON entry {clip(value)!r} needs 'name' and 'path' keys"
        )
    base = obj.get("base_model_name")
    return LoraModule(str(obj["name"]), str(obj["path"]), str(base) if base else None, True)


def _looks_like_flag(token: str) -> bool:
    """argparse's rule: starts with '-', is not '-' alone and not a negative number."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


_ALL_OPTIONS = (
    vllm_flags.ZERO_ARG | vllm_flags.ONE_ARG | vllm_flags.OPTIONAL_ARG | vllm_flags.MULTI_ARG
)
_LONG_OPTIONS = sorted(o for o in _ALL_OPTIONS if o.startswith("--"))
_DASHED = re.compile(r"(?<=--)[^.]*")

# The flags the operator reads, with every option string vLLM maps to them.
ENABLE_LORA_ON = frozenset({"--enable-lora"})
_DEST = {
    "--enable-lora": "enable_lora",
    "--no-enable-lora": "enable_lora",
    "--disable-lora": "enable_lora",
    "--max-lora-rank": "max_lora_rank",
    "--max-loras": "max_loras",
    "--max-cpu-loras": "max_cpu_loras",
    "--lora-modules": "lora_modules",
    "--model": "model",
    "--served-model-name": "served_model_name",
    "--port": "port",
    "--uds": "uds",
    "--api-key": "api_key",
    "--api-server-count": "api_server_count",
    "-asc": "api_server_count",
    "--data-parallel-size": "data_parallel_size",
    "-dp": "data_parallel_size",
    "--data-parallel-size-local": "data_parallel_size_local",
    "-dpl": "data_parallel_size_local",
    "--data-parallel-external-lb": "external_lb",
    "-dpe": "external_lb",
    "--data-parallel-rank": "external_lb",
    "-dpn": "external_lb",
    "--data-parallel-hybrid-lb": "hybrid_lb",
    "-dph": "hybrid_lb",
    "--data-parallel-start-rank": "hybrid_lb",
    "-dpr": "hybrid_lb",
    "--headless": "headless",
}
# The canonical spelling the operator writes for a dest.
_WRITE = {
    "enable_lora": "--enable-lora",
    "max_lora_rank": "--max-lora-rank",
    "max_loras": "--max-loras",
    "max_cpu_loras": "--max-cpu-loras",
    "lora_modules": "--lora-modules",
}


def normalize_flag(token: str) -> str:
    """vLLM's spelling of a flag: underscores to dashes before any '.', as FlexibleArgumentParser."""
    if not token.startswith("--"):
        return token
    return _DASHED.sub(lambda m: m.group(0).replace("_", "-"), token, count=1)


def resolve_option(name: str) -> str | None:
    """The option string argparse matches ``name`` to (exact, else a unique prefix)."""
    if name in _ALL_OPTIONS:
        return name
    if not name.startswith("--"):
        return None
    hits = [o for o in _LONG_OPTIONS if o.startswith(name)]
    return hits[0] if len(hits) == 1 else None


def _arity(option: str | None) -> str:
    if option in vllm_flags.ZERO_ARG:
        return "0"
    if option in vllm_flags.OPTIONAL_ARG:
        return "?"
    if option in vllm_flags.MULTI_ARG:
        return "+"
    return "1"


@dataclass(frozen=True)
class Occurrence:
    """One flag as vLLM's parser sees it."""

    option: str  # canonical option string (e.g. --no-enable-lora)
    written: str  # as written (e.g. --no_enable_lora=...)
    values: tuple[str, ...]
    positions: tuple[int, ...]  # indexes in the combined stream (flag, then values)
    from_config: bool
    inline: bool
    dynamic: bool


@dataclass
class _Stream:
    """The argv vLLM's argparse sees: --config's YAML keys spliced in before the CLI's."""

    values: list[str]
    words: list[Word | None]  # None: the value came from the --config file


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a few aliases can expand into gigabytes of flags."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ServerArgsError(
                "the file uses YAML aliases (*name), which the operator does not expand"
            )
        return super().compose_node(parent, index)


def clip(text: str, limit: int = 120) -> str:
    """A tenant's value, bounded for messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_args(text: str, version: Version | None) -> list[str]:
    """A --config YAML file as vLLM's load_config_file turns it into flags."""
    data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: plain data only
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ServerArgsError("not a YAML mapping of flag: value; vLLM refuses to start")
    out: list[str] = []
    newer = version is None or version > (0, 20)
    for key, value in data.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            if value:
                out.append(flag)
            elif newer and f"--no-{key}" in _ALL_OPTIONS:  # exact, as vLLM looks it up
                # After 0.20, false writes --no-KEY when that option exists; before, nothing.
                out.append(f"--no-{key}")
        elif isinstance(value, list):
            if value:
                out.append(flag)
                # str() even for mappings: a list of {name, path} gives Python reprs,
                # which vLLM's --lora-modules parser refuses.
                out.extend(str(v) for v in value)
        elif isinstance(value, dict):
            json_dicts = version is None or version > OLD
            out.extend([flag, json.dumps(value) if json_dicts else str(value)])
        else:
            out.extend([flag, str(value)])
    return out


def _stream(
    argv: Sequence[Word],
    serve: bool,
    version: Version | None,
    read_config: ConfigReader | None,
    problems: list[str],
) -> tuple[_Stream, str | None]:
    values = [w.value for w in argv]
    words: list[Word | None] = list(argv)
    for w in argv:
        if w.value.startswith("--config="):
            problems.append(
                f"{w.value}: vLLM reads a config file only from --config FILE (two words); "
                "this one is ignored"
            )
    count = values.count("--config")
    if count == 0:
        return _Stream(values, words), None
    if count > 1:
        problems.append("--config is given more than once: vLLM refuses to start")
    idx = values.index("--config")
    if idx + 1 >= len(values):
        problems.append("--config has no file: vLLM refuses to start")
        return _Stream(values[:idx], words[:idx]), None
    path = values[idx + 1]
    rest_v = values[:idx] + values[idx + 2 :]
    rest_w = words[:idx] + words[idx + 2 :]
    if argv[idx + 1].dynamic:
        problems.append(
            f"--config {path} depends on the shell environment: the operator cannot read it"
        )
        return _Stream(rest_v, rest_w), path
    if not path.endswith((".yaml", ".yml")):
        problems.append(f"--config {path}: vLLM reads only .yaml/.yml files and refuses to start")
        return _Stream(rest_v, rest_w), path
    text, why = read_config(path) if read_config else (None, None)
    if text is None:
        problems.append(why or f"--config {path} cannot be read by the operator")
        return _Stream(rest_v, rest_w), path
    try:
        extra = _config_args(text, version)
    except yaml.YAMLError as exc:
        why = clip(str(exc).splitlines()[0] if str(exc) else "invalid YAML")
        problems.append(f"--config {path}: not valid YAML ({why}); vLLM refuses to start")
        return _Stream(rest_v, rest_w), path
    except ServerArgsError as exc:
        problems.append(f"--config {path}: {exc}")
        return _Stream(rest_v, rest_w), path
    # vLLM splices the file's flags in after the subcommand and its MODEL, before the rest.
    head = 1 if serve and rest_v and not rest_v[0].startswith("-") else 0
    none: list[Word | None] = [None] * len(extra)
    return (
        _Stream(rest_v[:head] + extra + rest_v[head:], rest_w[:head] + none + rest_w[head:]),
        path,
    )


def _scan(stream: _Stream, problems: list[str]) -> tuple[list[Occurrence], list[str]]:
    """Walk the stream like argparse: flags with their values, and positionals."""
    occ: list[Occurrence] = []
    positionals: list[str] = []
    vals, i, n = stream.values, 0, len(stream.values)
    while i < n:
        raw = vals[i]
        if not _looks_like_flag(raw):
            positionals.append(raw)
            i += 1
            continue
        text = normalize_flag(raw)
        name, _, rest = text.partition("=")
        inline = rest if "=" in text else None
        positions = [i]
        i += 1
        if "." in name:  # --json-arg.key value: vLLM folds it into a JSON flag
            if inline is None and i < n:
                i += 1
            continue
        option = resolve_option(name)
        if option is None and name.startswith("--"):
            problems.append(
                f"{clip(name)}: not an option of vLLM 0.8.5 to 0.34 (vLLM refuses unknown flags)"
            )
        # A short option with its value attached (-O3, -tp2) takes nothing more.
        arity = _arity(option) if option or name.startswith("--") else "0"
        values: list[str] = []
        if inline is not None:
            if arity == "0":
                problems.append(f"{name}=...: {name} takes no value; vLLM refuses to start")
            values.append(inline)
        elif arity in ("1", "?"):
            if i < n and not _looks_like_flag(vals[i]):
                values.append(vals[i])
                positions.append(i)
                i += 1
            elif arity == "1":
                problems.append(f"{name} expects a value: vLLM refuses to start")
        elif arity == "+":
            while i < n and not _looks_like_flag(vals[i]):
                values.append(vals[i])
                positions.append(i)
                i += 1
            if not values:
                problems.append(f"{name} expects at least one value: vLLM refuses to start")
        words = [stream.words[p] for p in positions]
        occ.append(
            Occurrence(
                option or name,
                raw,
                tuple(values),
                tuple(positions),
                all(w is None for w in words),
                inline is not None,
                any(w is not None and w.dynamic for w in words),
            )
        )
    return occ, positionals


def _last(occ: Sequence[Occurrence], dest: str) -> Occurrence | None:
    hits = [o for o in occ if _DEST.get(o.option) == dest]
    return hits[-1] if hits else None


def _int(occ: Occurrence | None, default: int, problems: list[str]) -> int:
    if occ is None or not occ.values:
        return default
    if occ.dynamic:
        problems.append(
            f"{occ.written} {occ.values[0]} depends on the shell environment: the operator "
            f"cannot read it and assumes {default}"
        )
        return default
    try:
        return int(occ.values[0])
    except ValueError:
        problems.append(f"{occ.option} {occ.values[0]!r} is not an integer: vLLM refuses to start")
        return default


def _int_known(occ: Occurrence | None) -> bool:
    """Whether ``_int`` read a real value (or the default of an absent flag), not a guess."""
    if occ is None or not occ.values:
        return True
    if occ.dynamic:
        return False
    try:
        int(occ.values[0])
    except ValueError:
        return False
    return True


def parse_located(
    loc: Located,
    *,
    version: Version | None = None,
    read_config: ConfigReader | None = None,
) -> ServerArgs:
    """What vLLM's parser makes of the argv ``loc`` found."""
    problems = list(loc.problems)
    stream, config_file = _stream(loc.argv, loc.serve, version, read_config, problems)
    occ, positionals = _scan(stream, problems)
    out = ServerArgs(is_openai_server=True, form=loc.form, config_file=config_file)
    out.serve_command = loc.serve
    out.shell_env = dict(loc.env)
    model_flag = _last(occ, "model")
    positional = positionals[0] if loc.serve and positionals else None
    # (Not for the image's entry point: older images ran api_server, which takes --model.)
    explicit_serve = loc.serve and loc.form != "image entrypoint"
    if explicit_serve and model_flag is not None and version is not None and version <= OLD:
        problems.append(
            "vllm serve of vLLM 0.11 and older refuses --model: give the model as vllm serve MODEL"
        )
    if explicit_serve and _model_not_first(loc, version):
        problems.append(
            "vllm serve needs the model as its first argument when --served-model-name is "
            "given: vLLM 0.20 and later refuse to start (vllm serve MODEL --served-model-name ...)"
        )
    if positionals and not loc.serve:
        # make_arg_parser accepts a model_tag, but only `vllm serve` uses it.
        problems.append(
            f"{loc.form} ignores the positional model {clip(positionals[0], 60)}: give it "
            "with --model"
        )
    extra = positionals[1:]
    if extra:
        shown = " ".join(clip(e, 40) for e in extra[:3]) + (" ..." if len(extra) > 3 else "")
        problems.append(f"unrecognized arguments {shown}: vLLM refuses to start")
    out.model = positional or (model_flag.values[0] if model_flag and model_flag.values else None)
    served = _last(occ, "served_model_name")
    out.served_model_names = list(served.values) if served else []
    out.enable_lora = _enable_lora(occ, version, problems)
    out.max_lora_rank = _int(_last(occ, "max_lora_rank"), DEFAULT_MAX_LORA_RANK, problems)
    out.max_loras = _int(_last(occ, "max_loras"), DEFAULT_MAX_LORAS, problems)
    cpu = _last(occ, "max_cpu_loras")
    out.max_cpu_loras = _int(cpu, 0, problems) if cpu else None
    out.lora_modules = _lora_modules(_last(occ, "lora_modules"), problems)
    dropped = _dropped_adapters(occ)
    if dropped:
        problems.append(dropped)
    port = _last(occ, "port")
    out.port = _int(port, DEFAULT_PORT, problems)
    out.port_known = _int_known(port)
    out.port_from_config = port is not None and bool(port.values) and port.from_config
    uds = _last(occ, "uds")
    out.uds = uds.values[0] if uds and uds.values else None
    _api_keys(out, _last(occ, "api_key"))
    count = _last(occ, "api_server_count")
    out.api_server_count = _int(count, 1, problems) if count else None
    out.data_parallel_size = _int(_last(occ, "data_parallel_size"), 1, problems)
    local = _last(occ, "data_parallel_size_local")
    out.data_parallel_size_local = _int(local, 1, problems) if local else None
    out.external_lb = _last(occ, "external_lb") is not None
    out.hybrid_lb = _last(occ, "hybrid_lb") is not None
    out.headless = _last(occ, "headless") is not None
    _check_lora_settings(out, version, problems)
    out.problems = problems
    return out


_SERVED_NAME = re.compile(r"^--served[-_]model[-_]name(=.+|$)")
_MODEL_FLAG = re.compile(r"^--model(=.+|$)")


def _model_not_first(loc: Located, version: Version | None) -> bool:
    """FlexibleArgumentParser (0.20+): `vllm serve --flag ... --served-model-name` raises."""
    if version is not None and version <= OLD:
        return False
    values = [w.value for w in loc.argv]
    return (
        bool(values)
        and values[0].startswith("-")
        and not any(_MODEL_FLAG.match(v) for v in values)
        and "--config" not in values
        and any(_SERVED_NAME.match(v) for v in values)
    )


def _enable_lora(occ: Sequence[Occurrence], version: Version | None, problems: list[str]) -> bool:
    hit = _last(occ, "enable_lora")
    if hit is None:
        return False
    if hit.option == "--disable-lora" and version is not None and version <= (0, 20):
        problems.append(
            "--disable-lora is not a flag of vLLM 0.20 and older: vLLM refuses to start"
        )
    return hit.option in ENABLE_LORA_ON


def _dropped_adapters(occ: Sequence[Occurrence]) -> str | None:
    """Adapters listed under an earlier --lora-modules that vLLM ignores (last one wins)."""
    hits = [o for o in occ if _DEST.get(o.option) == "lora_modules"]
    if len(hits) < 2:
        return None
    last: set[str] = set()
    for value in hits[-1].values:
        try:
            last.add(parse_lora_module(value).name)
        except ServerArgsError:
            continue
    names: list[str] = []
    for hit in hits[:-1]:
        for value in hit.values:
            try:
                name = parse_lora_module(value).name
            except ServerArgsError:
                continue
            if name not in last and name not in names:
                names.append(name)
    if not names:
        return None
    return (
        f"--lora-modules is given {len(hits)} times and vLLM reads only the last: "
        f"{', '.join(names)} not served"
    )


def _lora_modules(hit: Occurrence | None, problems: list[str]) -> list[LoraModule]:
    if hit is None:
        return []
    if hit.dynamic:
        problems.append(
            "--lora-modules depends on the shell environment: the operator cannot read "
            "which adapters it lists"
        )
    modules = []
    for value in hit.values:
        if value == "":
            continue  # vLLM skips empty entries
        try:
            modules.append(parse_lora_module(value))
        except ServerArgsError as exc:
            problems.append(f"{exc}: vLLM refuses to start")
    return modules


def _api_keys(out: ServerArgs, hit: Occurrence | None) -> None:
    if hit is None:
        return
    keys = [v for v in hit.values if v]  # vLLM drops empty keys
    out.api_key_flag = bool(hit.values)
    out.api_keys_given = bool(keys)
    out.api_keys = keys
    out.api_key_dynamic = hit.dynamic
    out.api_key_from_config = hit.from_config


def allowed_ranks(version: Version | None) -> tuple[int, ...]:
    if version is not None and version <= OLD:
        return ALLOWED_MAX_LORA_RANKS_UP_TO_0_11
    return ALLOWED_MAX_LORA_RANKS


def _check_lora_settings(out: ServerArgs, version: Version | None, problems: list[str]) -> None:
    """The LoRAConfig checks vLLM runs at start-up (only with LoRA enabled)."""
    if not out.enable_lora:
        if out.lora_modules:
            problems.append(
                "--lora-modules lists adapters but LoRA is not enabled: add --enable-lora"
            )
        return
    ranks = allowed_ranks(version)
    if out.max_lora_rank not in ranks:
        problems.append(
            f"--max-lora-rank {out.max_lora_rank} is not one of {', '.join(map(str, ranks))}: "
            "vLLM refuses to start"
        )
    if out.max_loras < 1:
        problems.append(f"--max-loras {out.max_loras} must be at least 1: vLLM refuses to start")
    if out.max_cpu_loras is not None and 0 < out.max_cpu_loras < out.max_loras:
        problems.append(
            f"--max-loras {out.max_loras} is above --max-cpu-loras {out.max_cpu_loras}: "
            "vLLM refuses to start"
        )


def parse_container(
    container: Mapping[str, Any],
    *,
    image_patterns: Sequence[str] | None = None,
    version: Version | None = None,
    read_config: ConfigReader | None = None,
) -> ServerArgs:
    """Parse a container spec (``command`` + ``args``) into :class:`ServerArgs`.

    Raises :class:`ServerArgsError` for a ``--lora-modules`` entry vLLM would refuse (the
    operator must not guess which adapters a server lists); every other finding is in
    ``problems``. ``version`` defaults to the one in the image tag (None: the newest
    behaviour).
    """
    loc = locate(container, image_patterns=image_patterns)
    if loc is None:
        return ServerArgs(is_openai_server=False)
    version = version or image_version(container.get("image"))
    parsed = parse_located(loc, version=version, read_config=read_config)
    bad = [p for p in parsed.problems if p.startswith("--lora-modules: ")]
    if bad:
        raise ServerArgsError(bad[0].removesuffix(": vLLM refuses to start"))
    return parsed


def parse_tokens(tokens: Sequence[str]) -> ServerArgs:
    """Parse a raw command line (``command`` + ``args`` joined)."""
    return parse_container({"command": list(tokens)})


def server_argv(
    container: Mapping[str, Any], *, image_patterns: Sequence[str] | None = None
) -> list[str]:
    """The words vLLM's parser receives after its entry point (``[]`` when not vLLM)."""
    loc = locate(container, image_patterns=image_patterns)
    return [w.value for w in loc.argv] if loc else []


# ------------------------------------------------------------------ editing


@dataclass(frozen=True)
class _Item:
    """A word of the edited argv: an original word (``word``) or a new one (``word`` None)."""

    value: str
    word: Word | None


@dataclass(frozen=True)
class EditContext:
    """What an edit needs besides the container: the image and the --config file."""

    image_patterns: Sequence[str] | None = None
    read_config: ConfigReader | None = None


def _parse(container: Mapping[str, Any], ctx: EditContext) -> ServerArgs:
    return parse_container(
        container, image_patterns=ctx.image_patterns, read_config=ctx.read_config
    )


def _require(container: Mapping[str, Any], ctx: EditContext) -> Located:
    loc = locate(container, image_patterns=ctx.image_patterns)
    if loc is None:
        raise ServerArgsError(
            "container does not run the vLLM OpenAI server (expected 'vllm serve <model>', "
            "'python -m vllm.entrypoints.openai.api_server' or 'python -m "
            "vllm.entrypoints.cli.main serve', directly or in a sh -c script, or the vLLM "
            "image's own entry point with args only)"
        )
    if loc.script is not None and loc.problems and not loc.argv:
        raise ServerArgsError(loc.problems[0])
    return loc


def _cli_occurrences(
    container: Mapping[str, Any], loc: Located, ctx: EditContext
) -> tuple[list[Occurrence], _Stream]:
    problems: list[str] = []
    version = image_version(container.get("image"))
    stream, config_file = _stream(loc.argv, loc.serve, version, ctx.read_config, problems)
    unread = [p for p in problems if config_file and config_file in p]
    if unread:
        # The file may list adapters or limits a rewrite would lose or contradict.
        raise ServerArgsError(
            f"{unread[0]}; the operator edits the command line only once it can read it"
        )
    occ, _ = _scan(stream, problems)
    return occ, stream


def _argv_index(stream: _Stream, loc: Located, position: int) -> int:
    word = stream.words[position]
    assert word is not None
    return loc.argv.index(word)


def _set_dest(
    container: Mapping[str, Any],
    ctx: EditContext,
    dest: str,
    values: Sequence[str] | None,
) -> dict[str, Any]:
    """Write ``--flag values`` for ``dest`` (None: remove it), dropping every other spelling."""
    loc = _require(container, ctx)
    occ, stream = _cli_occurrences(container, loc, ctx)
    items = [_Item(w.value, w) for w in loc.argv]
    drop: set[int] = set()
    anchor: int | None = None
    for o in occ:
        if _DEST.get(o.option) != dest or o.from_config:
            continue
        # Only command-line words are removed (a --config flag may take CLI values).
        idxs = [_argv_index(stream, loc, p) for p in o.positions if stream.words[p] is not None]
        if not idxs:
            continue
        drop.update(idxs)
        anchor = idxs[0]
    new: list[_Item] = []
    if values is not None:
        new = [_Item(_WRITE[dest], None), *(_Item(v, None) for v in values)]
    kept = [it for k, it in enumerate(items) if k not in drop]
    candidates: list[tuple[list[_Item], Word | None]] = []
    if anchor is not None:
        at = len([k for k in range(anchor) if k not in drop])
        candidates.append((kept[:at] + new + kept[at:], loc.argv[anchor] if new else None))
    candidates.append((kept + new, None))
    for cand, in_place_of in candidates:
        out = _render(container, loc, cand, in_place_of)
        if _same_except(container, out, ctx, dest) and _written(out, ctx, dest, values):
            return out
    raise ServerArgsError(
        f"cannot write {_WRITE[dest]} into this command line without changing how vLLM "
        "reads its other arguments: edit it by hand"
    )


def _written(
    container: Mapping[str, Any], ctx: EditContext, dest: str, values: Sequence[str] | None
) -> bool:
    """vLLM reads the edited command line with ``dest`` set to ``values``."""
    try:
        after = _parse(container, ctx)
    except ServerArgsError:
        return False
    if dest == "lora_modules":
        want = [parse_lora_module(v) for v in values or () if v]
        got = after.lora_modules
        return [(m.name, m.path, m.base_model_name) for m in got] == [
            (m.name, m.path, m.base_model_name) for m in want
        ]
    if dest == "enable_lora":
        return after.enable_lora
    assert values is not None
    return bool(getattr(after, dest) == int(values[0]))


_COMPARED = (
    "model",
    "served_model_names",
    "enable_lora",
    "max_lora_rank",
    "max_loras",
    "max_cpu_loras",
    "lora_modules",
    "port",
    "api_keys",
)


def _same_except(
    before: Mapping[str, Any], after: Mapping[str, Any], ctx: EditContext, dest: str
) -> bool:
    """The edit changed only ``dest`` (guards against a value eating the positional MODEL)."""
    a = _parse(before, ctx)
    b = _parse(after, ctx)
    field_of = {"lora_modules": "lora_modules"}.get(dest, dest)
    return b.is_openai_server and all(
        getattr(a, f) == getattr(b, f) for f in _COMPARED if f != field_of
    )


def _render(
    container: Mapping[str, Any],
    loc: Located,
    items: Sequence[_Item],
    in_place_of: Word | None = None,
) -> dict[str, Any]:
    if loc.script is not None:
        return _render_script(container, loc, items, in_place_of)
    return _render_exec(container, loc, items)


def _render_exec(
    container: Mapping[str, Any], loc: Located, items: Sequence[_Item]
) -> dict[str, Any]:
    words = _tagged(container)
    start = len(words) - len(loc.argv)
    head = words[:start]
    tagged: list[tuple[str, Origin]] = [(w.value, w.origin) for w in head]
    origin: Origin = "args"
    last_origin: Origin | None = head[-1].origin if head else None
    for it in items:
        if it.word is not None:
            last_origin = it.word.origin
            tagged.append((it.value, it.word.origin))
        else:
            # A new word joins the list of the word before it (command words stay in
            # command); at the end it goes into args.
            tagged.append((it.value, last_origin or origin))
    if items and items[-1].word is None:
        # Trailing new words: args, unless the next original word would come before them.
        tail_from = max((k for k, it in enumerate(items) if it.word is not None), default=-1) + 1
        for k in range(len(head) + tail_from, len(tagged)):
            tagged[k] = (tagged[k][0], "args")
    out = dict(container)
    command = [t for t, o in tagged if o == "command"]
    args = [t for t, o in tagged if o == "args"]
    if container.get("command") is not None or command:
        out["command"] = command
    if container.get("args") is not None or args:
        out["args"] = args
    return out


def _render_script(
    container: Mapping[str, Any],
    loc: Located,
    items: Sequence[_Item],
    in_place_of: Word | None = None,
) -> dict[str, Any]:
    """Apply the edit as text edits: drop removed words, insert new ones (shell-quoted).

    Every other character of the script (redirections between words, line continuations,
    quoting of untouched words) stays as written.
    """
    script = loc.script
    assert script is not None and loc.end is not None
    for it in items:
        if it.word is None and "\n" in it.value:
            raise ServerArgsError("cannot write a value with a line break into a shell script")
    text = script.value
    kept = {id(it.word) for it in items if it.word is not None}
    edits: list[tuple[int, int, str]] = []
    if in_place_of is not None and in_place_of.span is not None:
        # The new flag takes the place of the removed occurrence it replaces.
        words = " ".join(shlex.quote(it.value) for it in items if it.word is None)
        edits.append((in_place_of.span[0], in_place_of.span[1], words))
        items = [it for it in items if it.word is not None]
    for w in loc.argv:
        if w is in_place_of:
            continue
        if id(w) not in kept and w.span is not None:
            begin = w.span[0]
            while begin > 0 and text[begin - 1] in " \t":
                begin -= 1  # the blanks before the word go with it
            edits.append((begin, w.span[1], ""))
    position = loc.argv[0].span[0] if loc.argv and loc.argv[0].span else loc.end
    pending: list[str] = []
    leading = True  # new words before any kept word go in front of the first argv word

    def flush() -> None:
        if not pending:
            return
        words = " ".join(shlex.quote(v) for v in pending)
        edits.append((position, position, f"{words} " if leading else f" {words}"))
        pending.clear()

    for it in items:
        if it.word is None:
            pending.append(it.value)
            continue
        flush()
        assert it.word.span is not None
        position, leading = it.word.span[1], False
    if not any(it.word is not None for it in items) and loc.argv:
        position, leading = loc.argv[-1].span[1] if loc.argv[-1].span else loc.end, False
    elif not loc.argv:
        leading = False
    flush()
    new_text = text
    for begin, end, repl in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        new_text = new_text[:begin] + repl + new_text[end:]
    out = dict(container)
    lst = list(out[script.origin])
    lst[script.index] = new_text
    out[script.origin] = lst
    return out


def _module_values(
    container: Mapping[str, Any], ctx: EditContext
) -> tuple[list[tuple[str, LoraModule]], bool]:
    """Every adapter listed under any --lora-modules spelling, with its exact text.

    vLLM reads only the last occurrence; the operator keeps the adapters of the others too
    when it rewrites the flag (the user listed them). The bool: some come from --config.
    """
    loc = _require(container, ctx)
    occ, _ = _cli_occurrences(container, loc, ctx)
    hits = [o for o in occ if _DEST.get(o.option) == "lora_modules"]
    if any(h.dynamic for h in hits):
        raise ServerArgsError(
            "--lora-modules uses shell expansions: the operator cannot tell which adapters "
            "it lists, so it will not rewrite it; list the adapters literally"
        )
    by_name: dict[str, tuple[str, LoraModule]] = {}
    for hit in hits:
        for value in hit.values:
            if value == "":
                continue
            mod = parse_lora_module(value)
            by_name.pop(mod.name, None)
            by_name[mod.name] = (value, mod)
    return list(by_name.values()), any(h.from_config for h in hits)


def _edit_context(ctx: EditContext | None) -> EditContext:
    return ctx or EditContext()


def set_lora_module(
    container: Mapping[str, Any], module: LoraModule, ctx: EditContext | None = None
) -> dict[str, Any]:
    """Return the container with this adapter's entry added or replaced; others kept."""
    ctx = _edit_context(ctx)
    current, _ = _module_values(container, ctx)
    values: list[str] = []
    replaced = False
    for text, mod in current:
        if mod.name == module.name:
            if not replaced:
                values.append(module.render())
            replaced = True
        else:
            values.append(text)
    if not replaced:
        values.append(module.render())
    return _set_dest(container, ctx, "lora_modules", values)


def remove_lora_module(
    container: Mapping[str, Any], name: str, ctx: EditContext | None = None
) -> dict[str, Any]:
    """Return the container without this adapter's entry; others kept."""
    ctx = _edit_context(ctx)
    current, from_config = _module_values(container, ctx)
    if all(mod.name != name for _, mod in current):
        return dict(container)
    values = [text for text, mod in current if mod.name != name]
    if not values and from_config:
        raise ServerArgsError(
            f"adapter {name} is listed in the --config file; vLLM cannot be told on the command "
            "line to list no adapters: remove it from the file"
        )
    return _set_dest(container, ctx, "lora_modules", values or None)


def ensure_enable_lora(
    container: Mapping[str, Any], ctx: EditContext | None = None
) -> dict[str, Any]:
    """Return the container with ``--enable-lora`` on (other spellings removed)."""
    ctx = _edit_context(ctx)
    current = _parse(container, ctx)
    loc = _require(container, ctx)
    occ, _ = _cli_occurrences(container, loc, ctx)
    spellings = [o for o in occ if _DEST.get(o.option) == "enable_lora" and not o.from_config]
    if current.enable_lora and all(o.option == "--enable-lora" and not o.inline for o in spellings):
        return dict(container)
    return _set_dest(container, ctx, "enable_lora", [])


def set_max_lora_rank(
    container: Mapping[str, Any], rank: int, ctx: EditContext | None = None
) -> dict[str, Any]:
    return _set_dest(container, _edit_context(ctx), "max_lora_rank", [str(rank)])


def set_max_loras(
    container: Mapping[str, Any], count: int, ctx: EditContext | None = None
) -> dict[str, Any]:
    """Set ``--max-loras``; raises ``--max-cpu-loras`` with it (vLLM refuses cpu < max)."""
    ctx = _edit_context(ctx)
    out = _set_dest(container, ctx, "max_loras", [str(count)])
    parsed = _parse(out, ctx)
    if parsed.max_cpu_loras is not None and 0 < parsed.max_cpu_loras < count:
        out = _set_dest(out, ctx, "max_cpu_loras", [str(count)])
    return out


def rank_setting_for(rank: int, version: Version | None = None) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    ranks = allowed_ranks(version)
    for allowed in ranks:
        if allowed >= rank:
            return allowed
    raise ServerArgsError(
        f"rank {rank} is above the largest --max-lora-rank vLLM accepts "
        f"({ranks[-1]}): retrain with a smaller lora.r"
    )


# ------------------------------------------------------------------ base models

_HF_REV = re.compile(r"@[^/]*$")


def normalize_model_name(name: str) -> str:
    """Compare-friendly form of a model reference: no scheme, revision or trailing slash."""
    _, text = split_scheme(name.strip())
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
