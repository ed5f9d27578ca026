"""The import structure: arrows point down the layers of docs/architecture.md, and there are no cycles.

Every `import` / `from ... import` in src/fedpeft is read with `ast`, the ones inside functions too
(a lazy import is still a dependency). A module's layer is the first prefix below that matches it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import from its own layer or any layer below it, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("fedpeft.errors", "fedpeft.atomic", "fedpeft.seeding", "fedpeft.hub", "fedpeft.figures", "fedpeft.methods",
                    "fedpeft.hardware")),
    ("data", ("fedpeft.data", "fedpeft.metrics", "fedpeft.nlg_metrics")),
    ("models", ("fedpeft.models",)),
    ("training", ("fedpeft.training", "fedpeft.generation")),
    ("settings", ("fedpeft.config",)),
    ("algorithms", ("fedpeft.algorithms",)),
    ("records", ("fedpeft.records",)),
    ("engines", ("fedpeft.engines",)),
    ("run", ("fedpeft.run",)),
    ("tools", ("fedpeft.bench", "fedpeft.flower_app")),
    ("entry points", ("fedpeft.cli", "fedpeft.__main__")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module == "fedpeft":  # the package's __init__: its face, at the bottom
        return 0
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """fedpeft modules `path` imports, resolved to the modules that exist (`from pkg import mod` → pkg.mod)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if not name.startswith("fedpeft"):
                continue
            while name and name not in modules:  # `from fedpeft.x import func` → fedpeft.x
                name = name.rpartition(".")[0]
            if name and name != here and name != "fedpeft":
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted((SRC / "fedpeft").rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_every_module_has_a_layer():
    for module in graph():
        layer_of(module)


def test_imports_point_down():
    upward = []
    for module, deps in sorted(graph().items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in sorted(g):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_nothing_imports_the_cli():
    users = [m for m, deps in graph().items() if "fedpeft.cli" in deps and m != "fedpeft.__main__"]
    assert not users


@pytest.mark.parametrize("bad", ["from fedpeft.engines.local import LocalEngine"])
def test_the_check_sees_function_level_imports(tmp_path, bad):
    """A lazy import inside a function is found: the guard cannot be dodged by hiding an import."""
    src = tmp_path / "fedpeft" / "models"
    src.mkdir(parents=True)
    f = src / "x.py"
    f.write_text(f"def f():\n    {bad}\n")
    global SRC
    old, SRC = SRC, tmp_path
    try:
        found = imports_of(f, {"fedpeft.engines.local", "fedpeft.models.x"})
    finally:
        SRC = old
    assert found == {"fedpeft.engines.local"}
