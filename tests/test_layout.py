"""The package's shape: the product stands alone, nothing imports in a circle, the public
API is at the top, and every error the package raises is a MaculaError."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import pkgutil

import macula
from macula.errors import MaculaError

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found[name] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> modules of src/ it imports, counting imports inside functions and under
    TYPE_CHECKING: a hidden cycle is still a cycle."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_anywhere_in_src() -> None:
    assert cycles(import_graph()) == []


def test_the_checker_sees_a_cycle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]


def test_the_product_never_imports_the_lab() -> None:
    graph = import_graph()
    leaks = {m: sorted(t for t in deps if t.startswith("macula_lab"))
             for m, deps in graph.items() if m.startswith("macula.") or m == "macula"}
    assert {m: d for m, d in leaks.items() if d} == {}


def test_public_api_at_the_top() -> None:
    from macula import Gateway, GatewayOptions, Identity, Node, NodeOptions  # noqa: F401

    for name in macula.__all__:
        assert hasattr(macula, name), name
    assert (SRC / "macula" / "py.typed").exists()


def test_every_exception_class_derives_from_macula_error() -> None:
    strays = []
    for info in pkgutil.walk_packages(macula.__path__, "macula."):
        if info.name.endswith(".__main__"):  # importing it would run it
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__ and not issubclass(obj, MaculaError)):
                strays.append(f"{module.__name__}.{name}")
    assert strays == []


def test_no_bare_builtin_raises_in_the_product() -> None:
    """`raise ValueError(...)` would escape `except MaculaError`; InvalidValue is both."""
    builtin = {"ValueError", "TypeError", "IndexError", "KeyError", "RuntimeError"}
    found = []
    for path in (SRC / "macula").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and isinstance(node.exc.func, ast.Name) and node.exc.func.id in builtin:
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
