"""The package layout is the architecture (docs/development.md, "Architecture"): each folder
imports only the layers below it, the pure layers import no Kubernetes, kopf, HTTP or metrics
library, and the trainer needs nothing of the operator but its API types and pure rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_ROOT = ROOT / "operator"
TRAINER_ROOT = ROOT / "trainer-image"

# What each part of finetune_operator may import of finetune_operator (a part is a subpackage
# or a module at the package root). Parts not listed here (main, cli, cleanup) wire
# everything together and may import any part.
ALLOWED = {
    "api": {"api", "domain"},
    "domain": {"api", "domain"},
    "serving": {"api", "domain", "serving"},
    "tools": {"api", "domain", "serving", "tools"},
    "policy": {"api", "domain"},
    "config": {"api", "domain", "policy"},
    "builders": {"api", "domain", "serving", "policy", "config", "builders"},
    "planners": {"api", "domain", "serving", "policy", "config", "builders", "planners"},
    "clients": {"api", "domain", "serving", "builders", "planners", "clients"},
    "metrics": {"api", "domain"},
    "metrics_serving": {"api", "domain", "metrics"},
    "handlers": {
        "api",
        "domain",
        "serving",
        "policy",
        "config",
        "builders",
        "planners",
        "clients",
        "metrics",
        "metrics_serving",
        "handlers",
    },
}
# Libraries of the outside world (the cluster, HTTP, metrics): only clients, handlers and the
# wiring use them, so everything below can run, and be tested, without them.
IO_LIBRARIES = {"kopf", "kubernetes", "aiohttp", "prometheus_client"}
PURE = {"api", "domain", "serving", "tools", "policy", "config", "builders", "planners"}
# The packages whose code the trainer image carries (trainer-image/Dockerfile).
TRAINER_SHARED = {"api", "domain"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> Iterator[str]:
    """Every module the file imports, at the top or inside functions, relative ones resolved
    (``from pkg import sub`` yields ``pkg.sub`` when ``sub`` is a module)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                location = root / Path(*sub.split("."))
                is_module = location.is_dir() or location.with_suffix(".py").is_file()
                yield sub if is_module else base


def part_of(module: str) -> str:
    """``finetune_operator.planners.finetunejob`` -> ``planners``; ``...config`` -> ``config``."""
    return module.split(".")[1]


def operator_files() -> list[Path]:
    return sorted((OPERATOR_ROOT / "finetune_operator").rglob("*.py"))


def test_every_part_of_the_package_has_a_rule() -> None:
    modules = {module_name(path, OPERATOR_ROOT) for path in operator_files()}
    parts = {part_of(module) for module in modules - {"finetune_operator"}}
    assert parts - set(ALLOWED) == {"main", "cli", "cleanup"}


@pytest.mark.parametrize("path", operator_files(), ids=lambda p: str(p.relative_to(OPERATOR_ROOT)))
def test_each_layer_imports_only_the_layers_below_it(path: Path) -> None:
    module = module_name(path, OPERATOR_ROOT)
    if module == "finetune_operator":
        return
    part = part_of(module)
    for imported in imported_modules(path, OPERATOR_ROOT):
        top = imported.split(".")[0]
        assert top not in {"finetune_local", "finetune_trainer"}, (
            f"{module} imports {imported}: the operator needs neither the local package nor "
            "the trainer"
        )
        if part in PURE:
            assert top not in IO_LIBRARIES, f"{module} ({part}) imports {imported}"
        if top == "finetune_operator" and imported != "finetune_operator" and part in ALLOWED:
            assert part_of(imported) in ALLOWED[part], (
                f"{module} ({part}) imports {imported} ({part_of(imported)}); "
                f"{part} may import only {sorted(ALLOWED[part])}"
            )


def test_trainer_imports_only_the_api_types_and_the_pure_rules() -> None:
    trainer = sorted((TRAINER_ROOT / "finetune_trainer").rglob("*.py"))
    assert trainer
    used = set()
    for path in trainer:
        for imported in imported_modules(path, TRAINER_ROOT):
            if imported.startswith("finetune_operator."):
                used.add(part_of(imported))
            assert imported.split(".")[0] != "finetune_local", path
    assert used == TRAINER_SHARED


BLOCK_AND_IMPORT = """
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} must not be imported here")
        return None

sys.meta_path.insert(0, Block())
for package_name in {packages!r}:
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages(package.__path__, package_name + "."):
        importlib.import_module(info.name)
loaded = sorted(n for n in sys.modules if n.split(".")[0] in {blocked!r})
assert not loaded, loaded
"""


def test_pure_layers_import_without_kopf_kubernetes_aiohttp_or_prometheus() -> None:
    """What the trainer image and the tools load works with those libraries absent."""
    packages = [f"finetune_operator.{part}" for part in ("api", "domain", "serving")]
    code = BLOCK_AND_IMPORT.format(blocked=sorted(IO_LIBRARIES), packages=packages)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(OPERATOR_ROOT), "PATH": ""},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
