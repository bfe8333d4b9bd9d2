"""The package's layout (docs/design.md, "Layout"), read from its imports.

Each module stands one floor above the highest package module it imports at run time (imports
under ``if TYPE_CHECKING:`` are for type checkers and do not count); the ground floor holds the
shared records. These tests keep the building low and its rooms separate.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_lowrank"

#: Records every stage shares, and the errors; they import only each other.
GROUND = {"errors", "types", "records"}
#: Helpers: small services any stage may use.
HELPERS = {
    "backend",
    "config",
    "cost",
    "data",
    "device",
    "feeds",
    "graphs",
    "index",
    "load",
    "save",
    "sessions",
    "surgery",
    "timing",
    "walk",
}
#: Rooms of one stage, which may share that stage's records (room -> stage).
ROOMS = {
    "solvers": "allocate",
    "metrics": "validate",
    "history": "discover",
    "plots": "report",
}
#: What stands above the stages and puts them in order.
TOP = {"pipeline", "sweeps", "cli", "cli_options", "cli_files", "__init__", "__main__"}
#: pipeline.py's floor may not be higher than this.
PIPELINE_FLOOR = 5
#: No module is longer.
MAX_LINES = 600


def _modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def _runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement, less those in ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(inner) for inner in ast.walk(node)}
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped
    ]


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))


@cache
def _imports(module: str) -> dict[str, set[str]]:
    """Package module -> names imported from it (``"*"`` for the module itself)."""
    found: dict[str, set[str]] = {}
    modules = set(_modules())
    for node in _runtime_imports(_tree(module)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.setdefault(node.module.split(".")[0], set()).update(
                    alias.name for alias in node.names
                )
            else:
                for alias in node.names:
                    if alias.name in modules:
                        found.setdefault(alias.name, set()).add("*")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("onnx_lowrank"):
            raise AssertionError(f"{module}.py imports the package absolutely: {node.module}")
    found.pop(module, None)
    return {name: names for name, names in found.items() if name in modules}


@cache
def floor(module: str) -> int:
    if module in GROUND:
        return 0
    below = [floor(other) for other in _imports(module)]
    return 1 + max(below, default=-1)


def _records(module: str) -> set[str]:
    """The dataclasses ``module`` defines."""
    return {
        node.name
        for node in _tree(module).body
        if isinstance(node, ast.ClassDef)
        and any("dataclass" in ast.unparse(decorator) for decorator in node.decorator_list)
    }


def _stage(module: str) -> str:
    return ROOMS.get(module, module)


def test_the_package_has_the_modules_this_test_knows():
    stages = set(_modules()) - GROUND - HELPERS - TOP
    assert stages, "no stage modules found"
    assert GROUND | {"pipeline", "sessions"} <= set(_modules())


def test_the_ground_floor_imports_nothing_above_it():
    for module in GROUND:
        assert set(_imports(module)) <= GROUND, (module, sorted(_imports(module)))


def test_no_stage_imports_a_record_type_from_another_stage():
    stages = set(_modules()) - GROUND - HELPERS - TOP
    offences = []
    for module in sorted((stages | HELPERS) & set(_modules())):
        for other, names in _imports(module).items():
            if other in stages and _stage(other) != _stage(module):
                records = names & _records(other)
                if records:
                    offences.append(f"{module} imports {sorted(records)} from {other}")
    assert not offences, "records belong on the ground floor (types.py, records.py): " + str(
        offences
    )


def test_only_sessions_imports_onnxruntime():
    importers = []
    for module in _modules():
        for node in ast.walk(_tree(module)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(name.split(".")[0] == "onnxruntime" for name in names):
                importers.append(module)
    assert set(importers) == {"sessions"}, importers


def test_pipeline_stands_at_most_five_floors_above_the_ground():
    assert floor("pipeline") <= PIPELINE_FLOOR, {
        module: floor(module) for module in _imports("pipeline")
    }


@pytest.mark.parametrize("module", _modules())
def test_no_module_is_longer_than_600_lines(module):
    lines = (PACKAGE / f"{module}.py").read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{module}.py has {lines} lines"


def test_the_floors_are_what_docs_design_md_shows():
    """docs/design.md's table of modules lists every module with its floor."""
    text = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    missing = [
        f"{module}.py ({floor(module)})"
        for module in _modules()
        if f"| `{module}.py` | {floor(module)} |" not in text
    ]
    assert not missing, "docs/design.md's module table lacks or misstates: " + ", ".join(missing)
