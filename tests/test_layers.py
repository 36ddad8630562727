"""The layers of DESIGN.md: data <- rollouts <- rewards <- trainers <- launch.

Reads every module's imports (without importing it) and fails on an import that points up a layer,
on a cycle between modules, on a treetune import inside a function (they sit at the top, so the
graph is visible), and on a package folder that pyproject.toml does not install.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("data", "rollouts", "rewards", "trainers", "launch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "treetune." + ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def treetune_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at top level) for every treetune import of a file; `from pkg import
    name` counts as an import of `pkg.name` when that is a module."""
    known = modules()
    out = []
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("treetune."):
                out.append((name, node.lineno, id(node) in top))
    return out


def layer_of(module: str) -> int:
    return LAYERS.index(module.split(".")[1]) if module.split(".")[1] in LAYERS else -1


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for target, _, _ in treetune_imports(path):
            if target in known and target != module:
                edges[module].add(target)
    return edges


def test_no_import_points_up_a_layer():
    wrong = []
    for module, path in modules().items():
        for target, line, _ in treetune_imports(path):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({LAYERS[layer_of(module)]}) imports "
                             f"{target} ({LAYERS[layer_of(target)]})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def test_treetune_imports_sit_at_the_top():
    lazy = [f"{path.relative_to(ROOT)}:{line}: {target}" for module, path in modules().items()
            for target, line, at_top in treetune_imports(path) if not at_top]
    assert not lazy, "treetune imports inside functions (move them to the top of the file):\n" + "\n".join(lazy)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package's __init__ re-exporting its own modules is not a cycle of its own modules importing it
    edges = graph()
    for module in edges:
        if modules()[module].name == "__init__.py":
            edges[module] = {t for t in edges[module] if not t.startswith(module + ".")}
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_package_folder_is_installed():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for layer in LAYERS for p in (ROOT / layer).rglob("__init__.py")}
    missing = folders - declared
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
    code_folders = {module_name(p / "__init__.py") for layer in LAYERS for p in (ROOT / layer).rglob("*")
                    if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    assert code_folders <= folders, f"code folders without __init__.py: {sorted(code_folders - folders)}"
