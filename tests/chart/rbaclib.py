"""Derive the Kubernetes permissions the operator needs from its source code.

Two sources:
- kopf decorators (`kopf.on.*`, `kopf.timer`, `kopf.daemon`, `kopf.index`): kopf lists and
  watches those resources; for change handlers it also patches the object (finalizer and
  progress annotations) and posts Events.
- Calls on the operator's API clients (`clients/kube.py`, `clients/serving_kube.py`): every
  call site `<something named kube>.<method>(kind, ...)` in the package is found with `ast`,
  the kind is resolved (a literal, a constant, a `for kind in (...)` loop, or a dataclass field
  typed `kind: Literal[...]`), and the real client method is run once per kind against a
  recording API server on a local port, so the HTTP method and path come from
  the client's own code. Paths are then turned into RBAC (apiGroup, resource, verb) triples.

A call site whose kind cannot be resolved is reported, never guessed.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes.client import ApiClient, Configuration

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "operator" / "finetune_operator"
# Code that runs only in tests or on a workstation, never in the operator pod.
# `cleanup.py`: a command an administrator runs with their own credentials after uninstalling.
NOT_IN_THE_POD = {"local", "clients", "cleanup.py"}
CLIENT_CLASSES = {
    "finetune_operator.clients.kube": "KubeClient",
    "finetune_operator.clients.serving_kube": "ServingKube",
}
# Client methods that send no API request (closing the connection pool).
NOT_API_CALLS = {"close"}
KOPF_CHANGE_HANDLERS = {"create", "update", "delete", "resume", "field"}
KOPF_WATCHING = KOPF_CHANGE_HANDLERS | {"event", "timer", "daemon", "index"}

Permission = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


@dataclass
class CallSite:
    module: str
    line: int
    method: str
    kinds: set[str]
    keywords: dict[str, Any] = field(default_factory=dict)


@dataclass
class Derived:
    permissions: dict[Permission, set[str]] = field(default_factory=dict)  # -> why
    unresolved: list[str] = field(default_factory=list)

    def add(self, permission: Permission, why: str) -> None:
        self.permissions.setdefault(permission, set()).add(why)


# ---------------------------------------------------------------- path -> permission


def permission_of(http_method: str, path: str, query: str = "") -> Permission:
    """The RBAC triple an API request needs, as the API server's authorizer computes it."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        raise ValueError(f"not a resource path: {path}")
    if rest and rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    method = http_method.upper()
    if method == "GET":
        verb = "watch" if re.search(r"(^|&)watch=(true|1)", query) else ("get" if name else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method) or (
            "delete" if name else "deletecollection"
        )
    return (group, f"{resource}/{sub}" if sub else resource, verb)


# ---------------------------------------------------------------- recording transport


class RecordingApiServer:
    """Stands in for the API server: records each request's method and path, answers 200
    (an empty list; an empty body for pod logs)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path_qs))
        if request.path.endswith("/log"):
            return web.Response(body=b"")
        return web.json_response({"items": [], "metadata": {}})

    async def run(self, call: Callable[[str], Awaitable[Any]]) -> None:
        """Serve on a free local port while ``call(url)`` runs."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            await call(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


def _argument_for(parameter: str, kind: str, keywords: dict[str, Any]) -> Any:
    if parameter in keywords:
        return keywords[parameter]
    meta = {"name": "n", "namespace": "ns", "uid": "u"}
    values: dict[str, Any] = {
        "kind": kind,
        "namespace": "ns",
        "ns": "ns",
        "name": "n",
        "pod": "p",
        "container": "c",
        "tail_lines": 10,
        "labels": {},
        "patch": {},
        "status": {},
        "ops": [],
        "resource_version": None,
        "body": {"kind": kind, "metadata": meta},
        "involved": {"apiVersion": "v1", "kind": kind, "metadata": meta},
        "type_": "Normal",
        "reason": "Reason",
        "message": "message",
    }
    if parameter not in values:
        raise KeyError(parameter)
    return values[parameter]


def requests_of(
    module_name: str, method: str, kind: str, keywords: dict[str, Any]
) -> list[tuple[str, str]]:
    """Run one client method for one kind against the recording API server."""
    module = importlib.import_module(module_name)
    client_class = getattr(module, CLIENT_CLASSES[module_name])
    server = RecordingApiServer()

    async def call(url: str) -> None:
        client = client_class(ApiClient(Configuration(host=url)))
        bound = getattr(client, method)
        arguments = {}
        for name, parameter in inspect.signature(bound).parameters.items():
            if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            try:
                arguments[name] = _argument_for(name, kind, keywords)
            except KeyError:
                if parameter.default is inspect.Parameter.empty:
                    raise
        try:
            result = bound(**arguments)
            if inspect.isawaitable(result):
                await result
        finally:
            await client.close()

    asyncio.run(server.run(call))
    return server.requests


def client_methods() -> dict[str, set[str]]:
    """Public coroutine methods of each client class, by module."""
    result: dict[str, set[str]] = {}
    for module_name, class_name in CLIENT_CLASSES.items():
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
        result[module_name] = {
            name
            for name, member in inspect.getmembers(cls, inspect.iscoroutinefunction)
            if not name.startswith("_") and name not in NOT_API_CALLS
        }
    return result


# ---------------------------------------------------------------- static scan


def operator_modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR)
        if relative.parts[0] in NOT_IN_THE_POD:
            continue
        dotted = ".".join(("finetune_operator", *relative.with_suffix("").parts))
        yield dotted.removesuffix(".__init__"), path


def action_classes() -> dict[str, type]:
    """Classes describing one API write: fields `verb` and `kind`, both typed Literal[...]."""
    found: dict[str, type] = {}
    for module_name, _ in operator_modules():
        module = importlib.import_module(module_name)
        for class_name, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ != module_name:
                continue
            try:
                hints = typing.get_type_hints(obj)
            except Exception:
                continue
            if all(typing.get_origin(hints.get(f)) is typing.Literal for f in ("verb", "kind")):
                found[class_name] = obj
    return found


def planned_writes() -> set[tuple[str, str]]:
    """(verb, kind) of every action the planners construct, e.g. Action("create", "Job", ...).

    Falls back to every combination the Literal types allow when a construction is not literal.
    """
    classes = action_classes()
    pairs: set[tuple[str, str]] = set()
    for _, path in operator_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func) in classes):
                continue
            cls = classes[ast.unparse(node.func)]
            order = [f for f in inspect.signature(cls).parameters]
            values = {order[i]: a for i, a in enumerate(node.args)}
            values.update({k.arg: k.value for k in node.keywords if k.arg})
            verb, kind = values.get("verb"), values.get("kind")
            if isinstance(verb, ast.Constant) and isinstance(kind, ast.Constant):
                pairs.add((str(verb.value), str(kind.value)))
            else:
                hints = typing.get_type_hints(cls)
                pairs.update(
                    (str(v), str(k))
                    for v in typing.get_args(hints["verb"])
                    for k in typing.get_args(hints["kind"])
                )
    return pairs


class _Resolver:
    def __init__(self, module_name: str, tree: ast.Module) -> None:
        self.globals = vars(importlib.import_module(module_name))
        self.loops: dict[int, dict[str, set[str]]] = {}
        self.planned = planned_writes()
        self.built_by: dict[int, dict[str, ast.expr]] = {}
        self._index_loops(tree)
        self._index_builders(tree)

    def _index_builders(self, tree: ast.Module) -> None:
        """`body = builder(...)` inside a function: remember the builder for later calls."""
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assigned: dict[str, ast.expr] = {}
            for stmt in ast.walk(func):
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Call)
                ):
                    assigned[stmt.targets[0].id] = stmt.value.func
            for inner in ast.walk(func):
                self.built_by.setdefault(id(inner), {}).update(assigned)

    def _kinds_returned_by(self, func_expr: ast.expr) -> set[str]:
        """Kinds of the dict literals a builder function returns ({"kind": "Deployment", ...})."""
        try:
            builder = eval(ast.unparse(func_expr), dict(self.globals))  # the operator's own source
            tree = ast.parse(inspect.getsource(builder).lstrip())
        except Exception:  # not a resolvable builder
            return set()
        kinds: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                for key, value in zip(node.value.keys, node.value.values, strict=True):
                    if (
                        isinstance(key, ast.Constant)
                        and key.value == "kind"
                        and isinstance(value, ast.Constant)
                    ):
                        kinds.add(str(value.value))
        return kinds

    def _index_loops(self, tree: ast.Module) -> None:
        """`for kind in ("Job", "ConfigMap")` and `for kind, ref in [("Secret", x), ...]`."""
        assignments = {
            n.targets[0].id: n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.For | ast.AsyncFor):
                continue
            iterable = node.iter
            if isinstance(iterable, ast.Name) and iterable.id in assignments:
                iterable = assignments[iterable.id]
            found: dict[str, set[str]] = {}
            if isinstance(node.target, ast.Name):
                values = self._literal_strings(iterable)
                if values:
                    found[node.target.id] = values
            elif isinstance(node.target, ast.Tuple):
                width = len(node.target.elts)
                for position, element in enumerate(node.target.elts):
                    if not isinstance(element, ast.Name):
                        continue
                    values = {
                        str(t.elts[position].value)  # type: ignore[attr-defined]
                        for t in ast.walk(iterable)
                        if isinstance(t, ast.Tuple)
                        and len(t.elts) == width
                        and isinstance(t.elts[position], ast.Constant)
                        and isinstance(t.elts[position].value, str)  # type: ignore[attr-defined]
                    }
                    if values:
                        found[element.id] = values
            for inner in ast.walk(node):
                self.loops.setdefault(id(inner), {}).update(found)

    @staticmethod
    def _literal_strings(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
        ):
            return {str(e.value) for e in node.elts}  # type: ignore[attr-defined]
        return set()

    def kinds(self, node: ast.AST, call: ast.AST, method: str) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Name):
            loop = self.loops.get(id(call), {})
            if node.id in loop:
                return loop[node.id]
            value = self.globals.get(node.id)
            if isinstance(value, str):
                return {value}
            built = self.built_by.get(id(call), {}).get(node.id)
            if built is not None:
                return self._kinds_returned_by(built)
        if isinstance(node, ast.Attribute) and node.attr in {"kind", "body"}:
            # A planned action carried out: the kinds planners construct for this verb.
            return {kind for verb, kind in self.planned if verb == method}
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "kind":
                    return self.kinds(value, call, method)
        return set()


def call_sites() -> tuple[list[CallSite], list[str]]:
    methods_by_client = client_methods()
    all_methods = set().union(*methods_by_client.values()) if methods_by_client else set()
    sites: list[CallSite] = []
    unresolved: list[str] = []
    for module_name, path in operator_modules():
        tree = ast.parse(path.read_text())
        resolver: _Resolver | None = None
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method = node.func.attr
            receiver = ast.unparse(node.func.value)
            if method not in all_methods or "kube" not in receiver.lower():
                continue
            resolver = resolver or _Resolver(module_name, tree)
            keywords = {
                k.arg: k.value.value
                for k in node.keywords
                if k.arg and isinstance(k.value, ast.Constant)
            }
            if method in {"read_log"}:
                kinds = {"Pod"}
            elif method in {"emit_event"}:
                kinds = {"Event"}
            elif node.args:
                kinds = resolver.kinds(node.args[0], node, method)
            elif "kind" in keywords:
                kinds = {str(keywords["kind"])}
            else:
                kinds = set()
            where = f"{module_name}:{node.lineno} {receiver}.{method}"
            carries_out_plans = bool(node.args) and isinstance(node.args[0], ast.Attribute)
            if not kinds and carries_out_plans:
                continue  # no planner constructs this verb: the branch never calls the API
            if not kinds:
                unresolved.append(where)
                continue
            sites.append(CallSite(module_name, node.lineno, method, kinds, keywords))
    return sites, unresolved


def _kopf_target(decorator: ast.Call, module_globals: dict[str, Any]) -> tuple[str, str] | None:
    """(group, plural) of a kopf decorator, or None for resource-less ones (startup, login)."""
    args: list[Any] = []
    for arg in decorator.args:
        try:
            args.append(eval(ast.unparse(arg), dict(module_globals)))
        except Exception:
            return None
    keywords = {k.arg: k.value for k in decorator.keywords if k.arg}
    for key in ("group", "plural"):
        if key in keywords:
            args.append(eval(ast.unparse(keywords[key]), dict(module_globals)))
    strings = [a for a in args if isinstance(a, str)]
    if len(strings) == 3:
        group, _version, plural = strings
        return group, plural
    if len(strings) == 1 and "." in strings[0]:
        plural, _, group = strings[0].partition(".")
        return group, plural
    if len(strings) == 1:
        return "", strings[0]
    return None


def kopf_permissions(derived: Derived) -> None:
    handlers_seen = False
    for module_name, path in operator_modules():
        tree = ast.parse(path.read_text())
        module_globals: dict[str, Any] | None = None
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                if not isinstance(decorator, ast.Call):
                    continue
                name = ast.unparse(decorator.func)
                match = re.fullmatch(r"kopf\.(?:on\.)?(\w+)", name)
                if not match or match.group(1) not in KOPF_WATCHING:
                    continue
                module_globals = module_globals or vars(importlib.import_module(module_name))
                target = _kopf_target(decorator, module_globals)
                where = f"{module_name}:{decorator.lineno} @{name}"
                if target is None:
                    derived.unresolved.append(where)
                    continue
                group, plural = target
                handlers_seen = True
                derived.add((group, plural, "list"), f"{where} (kopf lists)")
                derived.add((group, plural, "watch"), f"{where} (kopf watches)")
                if match.group(1) in KOPF_CHANGE_HANDLERS | {"timer", "daemon"}:
                    derived.add((group, plural, "patch"), f"{where} (kopf finalizer/progress)")
    if handlers_seen:
        derived.add(("", "events", "create"), "kopf posts handler events")


def derive() -> Derived:
    derived = Derived()
    kopf_permissions(derived)
    sites, unresolved = call_sites()
    derived.unresolved.extend(unresolved)
    module_of_method = client_methods()
    for site in sites:
        modules = [m for m, methods in module_of_method.items() if site.method in methods]
        for kind in sorted(site.kinds):
            for module_name in modules:
                try:
                    recorded = requests_of(module_name, site.method, kind, site.keywords)
                except KeyError:
                    continue  # this client does not know the kind
                for http_method, url in recorded:
                    path, _, query = url.partition("?")
                    derived.add(
                        permission_of(http_method, path, query),
                        f"{site.module}:{site.line} .{site.method}({kind})",
                    )
    return derived


def granted(rules: list[dict[str, Any]]) -> set[Permission]:
    """Flatten RBAC rules into triples."""
    triples: set[Permission] = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    triples.add((group, resource, verb))
    return triples
