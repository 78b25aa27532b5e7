"""The package's shape (docs/ARCHITECTURE.md), checked on the source text of wlshear/:

- layers import only downward: every import, at module level or inside a function, of one
  wlshear module by another goes to the same or a lower layer (the order of :data:`LAYERS`);
- no import cycles between modules;
- matplotlib only in wlshear.metrics.plots; no argparse (every command line composes conf/);
- no function over 80 lines; no module under wlshear/tasks over 300 lines;
- docs/ARCHITECTURE.md writes down the same layer order and every package is in a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "wlshear"
#: bottom to top; the package root (``wlshear/__init__.py``, the load_estimator facade) is above all
LAYERS = ("utils", "sim", "observables", "metrics", "data", "calibration", "models", "baselines", "clash", "tasks")
MAX_FUNCTION_LINES = 80
MAX_TASK_MODULE_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement in ``source``, anywhere in its body
    (inside functions too). ``from pkg import name`` counts as an import of ``pkg.name`` when that
    is a module of the package."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
    return out


def imports(module: str) -> list[tuple[str, int]]:
    path = MODULES[module]
    return imports_in(path.read_text(), module, path.name == "__init__.py")


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the package root
    return LAYERS.index(parts[1])


def test_every_module_is_in_a_layer():
    unassigned = sorted(m for m in MODULES if m != "wlshear" and m.split(".")[1] not in LAYERS)
    assert not unassigned, f"modules in no layer of LAYERS (add them to docs/ARCHITECTURE.md and here): {unassigned}"


def test_imports_only_go_down():
    upward = []
    for module in MODULES:
        for target, line in imports(module):
            if target.split(".")[0] == "wlshear" and target in MODULES and layer(target) > layer(module):
                upward.append(f"{MODULES[module].relative_to(REPO)}:{line} {module} ({LAYERS[layer(module)]}) imports "
                              f"{target} ({LAYERS[layer(target)] if layer(target) < len(LAYERS) else 'root'})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: {t for t, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name, allowed", [("argparse", ()), ("matplotlib", ("wlshear.metrics.plots",))])
def test_restricted_imports(name, allowed):
    found = [f"{MODULES[m].relative_to(REPO)}:{line}" for m in MODULES for t, line in imports(m)
             if (t == name or t.startswith(name + ".")) and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not found, f"{name} imported outside {allowed or 'nowhere allowed'}: {found}"


def test_no_function_over_80_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_task_modules_are_short():
    long = {str(p.relative_to(REPO)): n for p in (PKG / "tasks").glob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_TASK_MODULE_LINES}
    assert not long, f"modules under wlshear/tasks over {MAX_TASK_MODULE_LINES} lines: {long}"


def test_architecture_doc_matches_the_layers():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert " -> ".join(LAYERS) in doc, "docs/ARCHITECTURE.md must name the layer order " + " -> ".join(LAYERS)
    for name in LAYERS:
        assert f"`{name}`" in doc, f"docs/ARCHITECTURE.md does not describe the layer `{name}`"


def test_the_checker_sees_imports_inside_functions_and_relative_ones():
    src = ("import numpy as np\n\n\ndef f():\n    from wlshear.tasks import evaluate\n    from ..metrics import plots\n"
           "    import argparse\n    return evaluate, plots, argparse\n")
    found = [t for t, _ in imports_in(src, "wlshear.sim.render")]
    assert found == ["numpy", "wlshear.tasks.evaluate", "wlshear.metrics.plots", "argparse"]
    assert layer("wlshear.tasks.evaluate") > layer("wlshear.sim.render")
