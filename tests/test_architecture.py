"""The package's layers and their import rules, read from the source (every import, lazy ones too).

    engine      torch; arrays in, arrays out          may import: engine, config
    io          files, checkpoints, projects          may import: io, engine, config
    loop        the interactive loop without Qt       may import: loop, engine, io, config
    evaluation  metrics and rendered views            may import: evaluation
    _napari     the napari plugin (named in napari.yaml only; nothing imports it)
    public      __init__, api, cli, config, project, sample_data: anything but _napari

torch is imported in ``engine`` only, and no module takes part in an import cycle.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = "napari_sparse3d"
SOURCE = Path(__file__).parents[1] / "src" / PACKAGE
PUBLIC = {"__init__", "api", "cli", "config", "project", "sample_data", "distributed", "modelzoo"}
LAYERS = ("engine", "io", "loop", "evaluation", "_napari")
#: layer -> layers (and public modules) it may import
ALLOWED = {
    "engine": {"engine", "config"},
    "io": {"io", "engine", "config"},
    "loop": {"loop", "engine", "io", "config"},
    "evaluation": {"evaluation"},
    "_napari": set(LAYERS) | PUBLIC,
    "config": set(),
    "public": {"engine", "io", "loop", "evaluation"} | PUBLIC,
}
MAX_LINES = 400


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer of a module (``engine``, ...), or the public module's own name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _rules_of(unit: str) -> set[str]:
    if unit in ALLOWED:
        return ALLOWED[unit]
    return ALLOWED["public"]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[str]:
    """Every module imported anywhere in ``tree`` (functions included), except under TYPE_CHECKING."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append("<relative>")
            elif node.module:
                found.append(node.module)
                # "from napari_sparse3d import api" imports the module napari_sparse3d.api
                if node.module == PACKAGE:
                    found.extend(f"{PACKAGE}.{alias.name}" for alias in node.names if alias.name != "__version__")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports (``torch`` and ``<relative>`` kept as markers)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(ast.parse(path.read_text(), filename=str(path))):
            if imported == "torch" or imported.startswith("torch."):
                targets.add("torch")
            elif imported == "<relative>":
                targets.add(imported)
            elif imported == PACKAGE or imported.startswith(PACKAGE + "."):
                # the longest known module that the import names
                while imported not in modules and "." in imported:
                    imported = imported.rsplit(".", 1)[0]
                if imported != name:
                    targets.add(imported)
        graph[name] = targets
    return graph


def violations(root: Path) -> list[str]:
    """Every broken rule of the package at ``root``, one line each."""
    graph = import_graph(root)
    problems = []
    for module, targets in sorted(graph.items()):
        unit = _unit(module)
        for target in sorted(targets):
            if target == "<relative>":
                problems.append(f"{module} uses a relative import (absolute imports show the layer)")
            elif target == "torch":
                if unit != "engine":
                    problems.append(f"{module} imports torch (only engine may)")
            elif target != PACKAGE:
                other = _unit(target)
                if other == unit:
                    continue
                if other == "_napari" or other not in _rules_of(unit):
                    problems.append(f"{module} imports {target} ({unit} may not import {other})")
    problems.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph))
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one per strongly connected group), found by depth-first search."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_package_keeps_its_import_rules():
    assert violations(SOURCE) == []


def test_every_module_belongs_to_a_layer_or_the_public_surface():
    strays = [
        _module_name(p, SOURCE)
        for p in SOURCE.rglob("*.py")
        if _unit(_module_name(p, SOURCE)) not in set(LAYERS) | PUBLIC
    ]
    assert strays == []


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(SOURCE)): n for p in SOURCE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("engine/model.py", "from napari_sparse3d.io.files import write_aside", "engine may not import io"),
        ("engine/losses.py", "from napari_sparse3d._napari import state", "engine may not import _napari"),
        ("api.py", "import napari_sparse3d._napari.training", "api may not import _napari"),
        ("io/arrays.py", "import torch", "imports torch (only engine may)"),
        ("evaluation/metrics.py", "def f():\n    from napari_sparse3d.engine import model", "evaluation may not import engine"),
        ("engine/augment.py", "from . import model", "relative import"),
        ("engine/devices.py", "from napari_sparse3d.engine.training import Trainer", "import cycle"),
    ],
)
def test_the_rules_catch_a_forbidden_import(tmp_path, module, line, expected):
    copy = tmp_path / PACKAGE
    shutil.copytree(SOURCE, copy)
    target = copy / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    found = violations(copy)
    assert any(expected in problem for problem in found), found
    assert violations(SOURCE) == []  # the real tree is untouched
