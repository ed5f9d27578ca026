"""No import cycle through data/, models/ or bench/: imports only point down.

Every `import` / `from ... import` of src/fedpeft counts, also those inside functions or under
TYPE_CHECKING (a lazy import hides a cycle from Python, not from a reader). Pure `ast`: nothing is
imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
AREAS = ["fedpeft.data", "fedpeft.models", "fedpeft.bench"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "fedpeft").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fedpeft modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                out.append(sorted(members))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def cycles() -> list[list[str]]:
    known = _modules()
    return _cycles({name: _imports(name, path, known) for name, path in known.items()})


@pytest.mark.parametrize("area", AREAS)
def test_no_import_cycle_through(area, cycles):
    through = [c for c in cycles if any(m == area or m.startswith(area + ".") for m in c)]
    assert not through, f"import cycles through {area}: " + "; ".join(" <-> ".join(c) for c in through)


def test_the_check_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "fedpeft"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fedpeft.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from fedpeft import a\n")
    known = {"fedpeft": pkg / "__init__.py", "fedpeft.a": pkg / "a.py", "fedpeft.b": pkg / "b.py"}
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert graph["fedpeft.b"] == {"fedpeft.a"}
    assert _cycles(graph) == [["fedpeft.a", "fedpeft.b"]]
