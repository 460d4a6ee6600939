"""The package's shape: no import circle between its modules, and the stage packages upstream of the methods."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "wsss"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The wsss modules a file imports, at the top or lazily inside a function (a lazy import that closes a circle
    is still a circle: it only moves the failure to run time)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {t for t in found if t.startswith("wsss")}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {t for t in _imports(path) if t in files and t != name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ importing its own sub-modules is how packages work, not a circle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_circle():
    graph = {"wsss.a": {"wsss.b"}, "wsss.b": {"wsss.c"}, "wsss.c": {"wsss.a"}, "wsss.d": set()}
    assert _cycle(graph) == ["wsss.a", "wsss.b", "wsss.c", "wsss.a"]
    assert _cycle({"wsss.a": {"wsss.b"}, "wsss.b": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50  # the scan saw the package
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_stages_do_not_import_the_methods():
    """data, models, refine and evaluate are building blocks: they never import a method's folder."""
    graph = import_graph()
    for name, targets in graph.items():
        if name.split(".")[1:2] and name.split(".")[1] in ("data", "models", "refine", "evaluate"):
            offending = sorted(t for t in targets if t.startswith("wsss.methods.") and t != "wsss.methods.registry")
            assert not offending, f"{name} imports {offending}"


def test_readme_documents_every_registered_method_and_map():
    """The docs follow the registry: each built-in method and map formula has its row in the README."""
    from wsss.methods import REGISTRY

    readme = (SRC.parents[1] / "README.md").read_text()
    for name in REGISTRY.maps():
        assert f"| `{name}` |" in readme, f"map {name!r} has no row in the README's table"
    for method in REGISTRY:
        assert f"`{method.name}`" in readme, f"method {method.name!r} is not named in the README"
