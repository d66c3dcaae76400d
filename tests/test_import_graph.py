"""The package's imports point one way: no cycle between modules, and no import from a lower
floor to a higher one. The imports are read with `ast` (nothing is imported), every one of
them: at the top of a module, inside functions (lazy imports) and under `if` blocks alike."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "deepmlf_fast"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

FLOORS: list[tuple[str, ...]] = [
    ("errors", "fileio", "host"),
    ("data", "config", "ops"),
    ("layers", "backbones", "hardware", "metrics"),
    ("model", "presets"),
    ("train", "integrations", "memory", "bench"),
    ("report",),
    ("cli",),
    ("__main__", "__init__"),
]
"""The house, lowest floor first: each entry a subpackage or module of `deepmlf_fast` (`__init__`
is the package's own `__init__.py`). A module may import from its own floor and the floors
below it, never from a floor above."""


def module_name(path: Path) -> str:
    """`deepmlf_fast/a/b.py` -> `deepmlf_fast.a.b`; `deepmlf_fast/a/__init__.py` -> `deepmlf_fast.a`."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package: `{dotted name: file}`."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that module `name` imports, `{module: line of the first import}`;
    `from X import y` counts as an import of module `X.y` when that is a module, else of `X`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            known = target
            while known not in modules:  # `import deepmlf_fast.a.b` of a package `a`'s attribute b
                known = known.rpartition(".")[0]
                assert known, f"{path}:{node.lineno}: imports {target}, which is no module of {PACKAGE}"
            if known != name:
                found.setdefault(known, node.lineno)
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    modules = package_modules()
    return modules, {name: imported_modules(name, path, modules) for name, path in modules.items()}


def unit_of(module: str) -> str:
    """The part of the package a module belongs to: its subpackage, or itself for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(module: str) -> int:
    """The index in FLOORS of a module's part of the package."""
    unit = unit_of(module)
    for i, floor in enumerate(FLOORS):
        if unit in floor:
            return i
    raise AssertionError(f"{PACKAGE}.{unit} is on no floor: add {unit!r} to FLOORS in {__file__}, on the lowest "
                         f"floor above everything it imports and below everything that imports it")


def cycles(graph: dict[str, set[str] | dict[str, int]]) -> list[str]:
    """Every import loop a depth-first walk of `graph` ({node: nodes it imports}) closes, as 'a -> b -> a'."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dst in sorted(graph.get(node, ())):
            if state.get(dst) == 1:
                found.append(" -> ".join(path[path.index(dst):] + [dst]))
            elif dst not in state:
                visit(dst)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_part_of_the_package_is_on_a_floor():
    for module in package_modules():
        floor_of(module)


def test_no_import_runs_from_a_lower_floor_to_a_higher_one():
    modules, graph = import_graph()
    upward = [f"{modules[src].relative_to(ROOT.parent)}:{line}: {src} (floor {floor_of(src) + 1}) imports {dst} "
              f"(floor {floor_of(dst) + 1})"
              for src, targets in graph.items() for dst, line in targets.items() if floor_of(dst) > floor_of(src)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    _, graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_two_parts_on_one_floor_import_each_other():
    _, graph = import_graph()
    units: dict[str, set[str]] = {}
    for src, targets in graph.items():
        units.setdefault(unit_of(src), set()).update(unit_of(dst) for dst in targets if unit_of(dst) != unit_of(src))
    found = cycles(units)
    assert not found, "parts of the package that import each other (one of them belongs a floor higher):\n" + \
        "\n".join(found)
