"""Write operator/finetune_operator/serving/vllm_flags.py from vLLM's own argument parsers.

For each unpacked vLLM wheel given (a folder holding ``vllm/``), this builds the parser
``vllm serve`` uses (``make_arg_parser``) and records every option string with the number
of values it takes. vLLM's heavy dependencies are replaced by inert stand-ins while the
parser is built: only argparse declarations are read, nothing runs.

    python scripts/vllm_flag_table.py /work/vllm-src/0.8.5 /work/vllm-src/0.11.0 \
        /work/vllm-src/0.20.0 /work/vllm-src/0.34.0
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "operator" / "finetune_operator" / "serving" / "vllm_flags.py"

_DUMP = r"""
import abc, importlib.abc, importlib.machinery, json, sys, types

class _Meta(abc.ABCMeta):
    def __getattr__(cls, n):
        if n.startswith("__"):
            raise AttributeError(n)
        return _Meta(n, (_Any,), {})
    def __or__(cls, o): return cls
    def __ror__(cls, o): return cls

class _Any(metaclass=_Meta):
    def __class_getitem__(cls, item): return cls
    def __init__(self, *a, **k): pass
    def __init_subclass__(cls, **k): pass
    def __call__(self, *a, **k): return _Any()
    def __getattr__(self, n): return _Any()
    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema
        return core_schema.any_schema()

class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_Any,), {})

_PLATFORMS = ("tpu", "xla", "habana", "neuron", "ascend", "ipex", "intel", "rocm", "amdsmi",
              "pynvml", "hpu", "openvino")

class _Stand(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top == "vllm" or top in sys.stdlib_module_names or top.startswith("_"):
            return None
        if any(p in top for p in _PLATFORMS):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            try:
                if finder.find_spec(name, path, target) is not None:
                    return None
            except Exception:
                pass
        frame = sys._getframe(1)
        while frame is not None and (
            "importlib" in frame.f_code.co_filename
            or frame.f_code.co_filename.startswith("<frozen")
        ):
            frame = frame.f_back
        if frame is None or "/vllm/" not in frame.f_code.co_filename:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        module.__spec__ = spec
        return module
    def exec_module(self, module):
        pass

sys.meta_path.append(_Stand())
import vllm.platforms as platforms
from vllm.platforms.cpu import CpuPlatform
platforms._current_platform = CpuPlatform()
try:
    from vllm.entrypoints.common.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser())
table = {opt: (a.nargs if a.nargs is not None else 1)
         for opt, a in parser._option_string_actions.items()}
print("TABLE" + json.dumps(table, sort_keys=True))
"""


def dump(source: Path) -> dict[str, int | str]:
    proc = subprocess.run(
        [sys.executable, "-c", _DUMP],
        env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TABLE"))
    table: dict[str, int | str] = json.loads(line[len("TABLE") :])
    return table


def _frozenset(name: str, items: set[str]) -> str:
    lines = textwrap.wrap(
        " ".join(sorted(items)), width=88, break_on_hyphens=False, break_long_words=False
    )
    body = "\n".join(f"    {line}" for line in lines)
    return f'{name} = _options(\n    """\n{body}\n    """\n)\n'


def main(sources: list[str]) -> int:
    arity: dict[str, int | str] = {}
    versions = []
    for src in sources:  # later versions win where an option changed its arity
        versions.append(Path(src).name)
        arity.update(dump(Path(src)))
    arity.pop("-h", None)
    arity.pop("--help", None)
    classes: dict[str, set[str]] = {"ZERO": set(), "ONE": set(), "OPTIONAL": set(), "MULTI": set()}
    for opt, n in arity.items():
        key = {0: "ZERO", 1: "ONE", "?": "OPTIONAL", "+": "MULTI", "*": "MULTI"}.get(n, "MULTI")
        classes[key].add(opt)
    text = (
        '"""How many values each ``vllm serve`` option takes, read from vLLM\'s own parsers.\n\n'
        f"Generated by scripts/vllm_flag_table.py from vLLM {', '.join(versions)}; do not edit.\n"
        "Where an option's arity changed between versions, the newest one is kept.\n"
        '"""\n\n\n'
        "def _options(text: str) -> frozenset[str]:\n"
        "    return frozenset(text.split())\n\n\n"
        "# Options that take no value (store_true, BooleanOptionalAction and its --no-/--disable-\n"
        "# forms).\n" + _frozenset("ZERO_ARG", classes["ZERO"]) + "\n"
        "# Options that take exactly one value.\n" + _frozenset("ONE_ARG", classes["ONE"]) + "\n"
        "# Options whose value is optional (nargs='?').\n"
        + _frozenset("OPTIONAL_ARG", classes["OPTIONAL"])
        + "\n"
        "# Options that take one or more values, up to the next option (nargs='+').\n"
        + _frozenset("MULTI_ARG", classes["MULTI"])
    )
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(arity)} option strings)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
