"""What ``setup.py`` ships: the tools' packages, without test scaffolding or stray data files."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_keyword(name: str):
    call = next(
        node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def test_shipped_packages_hold_no_test_scaffolding():
    modules = [path for package in _setup_keyword("packages") for path in (ROOT / package.replace(".", "/")).glob("*.py")]
    assert len(modules) > 20
    for path in modules:
        assert not path.stem.startswith(("test", "conftest")), f"{path.relative_to(ROOT)} is test code"
        source = path.read_text()
        for name in ("tiny_models", "live_server", "save_tiny_lm", "class LiveServer"):
            assert name not in source, f"{path.relative_to(ROOT)} holds test scaffolding ({name})"


def test_every_data_file_a_package_reads_is_shipped():
    """Non-Python files inside shipped packages are listed in package_data (nothing is left behind)."""
    data = _setup_keyword("package_data")
    for package in _setup_keyword("packages"):
        folder = ROOT / package.replace(".", "/")
        for path in folder.iterdir():
            if path.is_file() and path.suffix not in (".py", ".pyc"):
                patterns = data.get(package, [])
                assert any(path.match(p) for p in patterns), f"{path.relative_to(ROOT)} is not in package_data"
