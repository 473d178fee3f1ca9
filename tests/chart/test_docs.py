"""User docs stay in step with the code: every condition reason the operator can write is
explained in docs/troubleshooting.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLANNERS = ROOT / "operator" / "finetune_operator" / "planners"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
CAMEL = re.compile(r"^[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)*$")


def parameters_by_callee(tree: ast.Module) -> dict[str, list[str]]:
    """Parameter names of the module's functions, methods and dataclass-like classes."""
    params: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
            params.setdefault(node.name, names)
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}

    def fields(cls: ast.ClassDef) -> list[str]:
        inherited = [
            f
            for base in cls.bases
            if (b := ast.unparse(base)) in classes
            for f in fields(classes[b])
        ]
        own = [
            stmt.target.id
            for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        ]
        return inherited + own

    for name, cls in classes.items():
        params.setdefault(name, fields(cls))
    return params


def reasons_in(path: Path, shared: dict[str, list[str]] | None = None) -> set[str]:
    """Literal arguments given to a parameter named `reason` anywhere in the module.

    ``shared``: parameters of types the module imports from another planner module (the
    Event of planners/events.py), so that positional reasons given to them count too.
    """
    tree = ast.parse(path.read_text())
    params = {**(shared or {}), **parameters_by_callee(tree)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        callee = ast.unparse(node.func).rsplit(".", 1)[-1]
        candidates = [k.value for k in node.keywords if k.arg == "reason"]
        names = params.get(callee, [])
        if "reason" in names and names.index("reason") < len(node.args):
            candidates.append(node.args[names.index("reason")])
        for arg in candidates:
            if (
                isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and CAMEL.match(arg.value)
            ):
                found.add(arg.value)
    return found


# Verdicts used inside a planner that never reach a condition.
INTERNAL_VERDICTS = {"Path"}  # adapterdeployment: where a Runtime-loaded adapter lives


def shared_parameters(planner: Path) -> dict[str, list[str]]:
    """Parameters of what a planner module may call from elsewhere: the shared Event type,
    and for a module of a planner package (planners/finetunejob/) its sibling modules (the
    status draft's ``cond`` lives in one module and is called from the others)."""
    shared = parameters_by_callee(ast.parse((PLANNERS / "events.py").read_text()))
    if planner.parent != PLANNERS:
        for sibling in sorted(planner.parent.glob("*.py")):
            for name, params in parameters_by_callee(ast.parse(sibling.read_text())).items():
                shared.setdefault(name, params)
    return shared


def all_reasons() -> set[str]:
    reasons: set[str] = set()
    for planner in sorted(PLANNERS.rglob("*.py")):
        reasons |= reasons_in(planner, shared_parameters(planner)) - INTERNAL_VERDICTS
    from finetune_operator.api.adapterdeployment import Reason
    from finetune_operator.api.finetunejob import Reason as FineTuneJobReason

    # The FineTuneJob and AdapterDeployment controllers list every reason they write as an enum.
    return reasons | {r.value for r in Reason} | {r.value for r in FineTuneJobReason}


def test_reason_scan_finds_the_planners_reasons() -> None:
    reasons = all_reasons()
    assert {"InsufficientGPUMemory", "Unschedulable", "GatesFailed"} <= reasons
    if (PLANNERS / "adapterdeployment.py").exists():
        assert {"DigestMismatch", "CanaryErrorRate"} <= reasons
    # Reasons only given positionally to the shared Event type (planners/events.py).
    assert {"RunStarted", "ChampionPromoted", "MissedSchedule"} <= reasons


def test_a_reason_written_as_a_string_in_a_planner_package_is_found(tmp_path: Path) -> None:
    """A reason given as a string to the status draft's ``cond`` (defined in another module
    of the package) is read as well, so it cannot slip past the documentation check."""
    module = tmp_path / "tracking.py"
    module.write_text('st.cond(C.TRAINING, "False", "NewlyInventedReason", "a message")\n')
    shared = shared_parameters(PLANNERS / "finetunejob" / "tracking.py")
    assert reasons_in(module, shared) == {"NewlyInventedReason"}
    assert "`NewlyInventedReason`" not in TROUBLESHOOTING.read_text()


@pytest.mark.parametrize("reason", sorted(all_reasons()))
def test_every_condition_reason_is_explained(reason: str) -> None:
    text = TROUBLESHOOTING.read_text()
    assert f"`{reason}`" in text, f"docs/troubleshooting.md does not explain reason {reason}"
