"""No test module imports another test module or a conftest: pytest hands fixtures to the tests,
and every other helper is a plain import from tests/support/ (or a helper module of one suite).
The message says where each name lives now."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SUPPORT = TESTS / "support"


def _support_names() -> dict[str, str]:
    """Top-level name -> the tests.support module that defines it."""
    found: dict[str, str] = {}
    for path in sorted(SUPPORT.glob("*.py")):
        module = "tests.support." + path.stem
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.setdefault(node.name, module)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, module)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                found.setdefault(node.target.id, module)
    return found


def _imported_module(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    parts = path.relative_to(ROOT).parent.parts
    package = parts[: len(parts) - node.level + 1]
    return ".".join([*package, *([node.module] if node.module else [])])


def _forbidden(module: str) -> bool:
    """A conftest or a test module (helper modules of one suite, e.g. tests/chaos/harness.py,
    may stay next to it; helpers several suites share belong in tests/support/)."""
    parts = module.split(".")
    if parts[0] != "tests" or parts[:2] == ["tests", "support"]:
        return False
    last = parts[-1]
    return last == "conftest" or last.startswith("test_") or len(parts) == 1


def test_no_test_module_imports_another_test_module_or_a_conftest() -> None:
    names = _support_names()
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        if SUPPORT in path.parents or "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = _imported_module(node, path)
                if not _forbidden(module):
                    continue
                fix = ", ".join(
                    f"{a.name} from {names.get(a.name, 'tests/support/ (move it there)')}"
                    for a in node.names
                )
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                problems.append(f"{where} imports {module}: take {fix}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _forbidden(alias.name):
                        problems.append(
                            f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}"
                        )
    assert not problems, "\n".join(problems)
