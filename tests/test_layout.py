"""The package's import structure: no cycle, and no import from a lower layer up.

Every ``import`` in the package is read from the source (function-local ones included;
``if TYPE_CHECKING:`` blocks excluded, as they never run), resolved to a module of the
package, and checked against the layers below. A module may import its own layer or any
layer under it. Also: no function is longer than 80 lines, docstrings aside.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import domlora_kernels

PKG = Path(domlora_kernels.__file__).resolve().parent

# Lowest first. A module is placed by its longest matching prefix.
LAYERS = [
    ("errors", "stats", "lora_init", "distributed", "files"),  # foundations: no import of the package
    ("ops",),  # the reductions
    ("scores",),  # the result type
    ("probe",),  # page_scores and its parts
    ("placement", "confidence", "report"),  # what is done with scores
    ("data", "models", "testing"),  # data, models, tiny models and oracles
    ("cli", "__init__"),  # entry points
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"domlora_kernels.{module} is in no layer of tests/test_layout.py; add it to LAYERS")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports at run time (relative to the package)."""
    module = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg or module == "__init__" else module.split(".")[:-1]
    if module == "__init__":
        base = []
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("domlora_kernels"):
                target = node.module.removeprefix("domlora_kernels").lstrip(".")
            else:
                target = None
            if target is not None:
                for alias in node.names:  # "from . import ops" imports the submodule ops
                    sub = f"{target}.{alias.name}" if target else alias.name
                    found.add(sub if (PKG / sub.replace(".", "/")).with_suffix(".py").exists()
                              or (PKG / sub.replace(".", "/")).is_dir() else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("domlora_kernels."):
                    found.add(alias.name.removeprefix("domlora_kernels."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard("")
    return found


GRAPH = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_no_import_from_a_lower_layer_up():
    up = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
          for m, targets in GRAPH.items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not up, "\n".join(up)


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in GRAPH:
        if m not in state:
            walk(m)


def test_the_walk_sees_the_imports():
    """The walk itself: it finds a module-level, a relative and a function-local import."""
    assert "scores" in GRAPH["probe.api"]
    assert "ops" in GRAPH["probe.checks"]
    assert "placement.budget" in GRAPH["cli"]  # imported inside _budget
    assert "probe.sites" not in GRAPH["probe.tap"]  # only under TYPE_CHECKING


def test_no_function_over_80_lines():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
