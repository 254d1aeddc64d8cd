"""docs/layout.md lists every module of the tree, and nothing that is not there.

A new module fails this test until its line is added; the message says which line, where.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "docs" / "layout.md"
# Packages whose every module is listed. tests/ lists only tests/support/'s modules and the
# test folders; migrations/ only env.py (versions/ is a folder of revisions).
NOT_LISTED_ONE_BY_ONE = {"tests", "protos"}


def layout_block() -> list[str]:
    text = LAYOUT.read_text()
    start = text.index("```\n") + 4
    return text[start : text.index("```", start)].splitlines()


def listed() -> tuple[set[str], set[str]]:
    """(files, folders) the Layout names, as paths from the repository root.

    A line is: two spaces of indent per folder level, one or more names separated by single
    spaces (a folder ends with "/"), then two or more spaces and what it is."""
    files: set[str] = set()
    folders: set[str] = set()
    stack: list[str] = []
    for line in layout_block():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        del stack[depth:]
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(" ")
        for name in names:
            path = "/".join([*stack, name.rstrip("/")])
            if name.endswith("/"):
                folders.add(path)
                if len(names) == 1:
                    stack.append(name.rstrip("/"))
            else:
                files.add(path)
    return files, folders


def _modules(folder: Path) -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for p in folder.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }


def in_tree() -> tuple[set[str], set[str]]:
    """(modules, folders) the Layout must name."""
    modules: set[str] = set()
    folders: set[str] = set()
    for top in sorted(ROOT.iterdir()):
        if (top / "__init__.py").is_file() and top.name not in NOT_LISTED_ONE_BY_ONE:
            modules |= _modules(top)
            folders |= {
                p.relative_to(ROOT).as_posix()
                for p in [top, *top.rglob("*")]
                if p.is_dir() and (p / "__init__.py").is_file()
            }
    modules |= _modules(ROOT / "tests" / "support")
    modules |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "migrations").glob("*.py")}
    folders |= {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "tests").iterdir()
        if p.is_dir() and any(p.glob("*.py"))
    }
    return modules, folders


def _where(files: set[str], folders: set[str]) -> str:
    lines = []
    for path in sorted(files | folders):
        parent, _, name = path.rpartition("/")
        name += "/" if path in folders else ""
        lines.append(f"  under `{parent}/`:  {name}  <what it is>" if parent else f"  {name}")
    return "\n".join(lines)


def test_every_module_is_in_the_layout() -> None:
    files, folders = listed()
    modules, wanted_folders = in_tree()
    missing_files, missing_folders = modules - files, wanted_folders - folders
    assert not (missing_files or missing_folders), (
        "docs/layout.md does not list these; add one line each in its block, "
        "indented two spaces per folder level below its folder's line:\n"
        + _where(missing_files, missing_folders)
    )


def test_the_layout_names_nothing_that_is_not_there() -> None:
    files, folders = listed()
    gone_files = {f for f in files if not (ROOT / f).is_file()}
    gone_folders = {d for d in folders if not (ROOT / d).is_dir()}
    assert not (gone_files or gone_folders), (
        "docs/layout.md names paths that do not exist; remove or rename their lines:\n"
        + _where(gone_files, gone_folders)
    )


def test_the_parser_reads_nested_folders_and_several_names_on_a_line() -> None:
    files, folders = listed()
    assert {
        "job_service/__main__.py",
        "job_service/main.py",
        "job_service/domain/errors.py",
    } <= files
    assert {"job_service", "job_service/domain", "tests/support"} <= folders
