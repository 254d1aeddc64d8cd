"""The configuration tables (docs/reference.md) name exactly the variables the code reads, with
their defaults; the README and docs/ name no variable the code does not read and no Makefile
target that does not exist; every file they name exists."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.v1 import jobs_pb2 as pb

from analysis_worker import config as worker_config
from job_service.config import Settings
from jobs_client import cli

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()
#: The README and every page of docs/, as (name, text).
DOCS = [
    (path.relative_to(ROOT).as_posix(), path.read_text())
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
]


def rows() -> dict[str, str]:
    """variable -> its row in docs/reference.md's configuration tables."""
    out: dict[str, str] = {}
    section = REFERENCE[REFERENCE.index("\n## Configuration\n") :]
    section = section[: section.index("\n## ", 1)]
    for line in section.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`((?:JOB_SERVICE|ANALYSIS_WORKER)_[A-Z0-9_]+)`", line):
                out[name] = line
    return out


def test_every_variable_the_code_reads_is_documented_with_its_default():
    table = rows()
    for name, default in [*Settings.env_table(), *worker_config.env_table()]:
        assert name in table, f"{name} missing from docs/reference.md's configuration tables"
        if default and name != "ANALYSIS_WORKER_WORKER_ID":
            assert f"`{default}`" in table[name] or default in table[name], (name, default)


def test_the_docs_name_no_variable_the_code_does_not_read():
    known = {n for n, _ in [*Settings.env_table(), *worker_config.env_table()]}
    # Error codes that share the prefix (JOB_SERVICE_ERROR) are not variables.
    known |= {name.removeprefix("ERROR_CODE_") for name in pb.ErrorCode.keys()}
    # jobctl's own variable for the service's address shares the prefix too.
    known.add(cli.ADDRESS_ENV)
    for doc, text in DOCS:
        named = set(re.findall(r"\b((?:JOB_SERVICE|ANALYSIS_WORKER)_[A-Z0-9_]+)\b", text))
        assert named - known == set(), doc


def test_make_targets_in_the_docs_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    for doc, text in DOCS:
        # In the README any "make x"; in docs/, where prose says "make the ...", only `make x`
        # and commands at the start of a line.
        pattern = r"`?make ([a-z-]+)" if doc == "README.md" else r"(?:`|^\s*)make ([a-z-]+)"
        for target in set(re.findall(pattern, text, re.M)):
            assert target in targets, (doc, target)


# S3 key prefixes the docs name, not files of the repository.
_NOT_PATHS = {"uploads/", "results/"}
# Where a path in the docs may be relative to (docs name `storage/tables.py` inside job_service).
_BASES = ("", "docs/", "job_service/", "analysis_worker/", "protos/gen/python/jobs/v1/")


def test_every_file_the_docs_name_exists():
    """Paths, links and markdown file names in README.md and docs/*.md point at real files."""
    # `path`, [text](path), and bare names of markdown files ("see lifecycle.md").
    reference = re.compile(r"`([^`\s]+)`|\]\(([^)\s#]+)|(?<![\w/.`\[(-])([\w/-]+\.md)\b")
    dangling = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in reference.finditer(doc.read_text()):
            token = match.group(1) or match.group(2) or match.group(3)
            if token in _NOT_PATHS or any(c in token for c in "<>*{}=$:,()"):
                continue  # placeholders, globs, URLs, commands
            if token.startswith(("-", ".", "/")):
                continue
            if not (token.endswith("/") or re.search(r"\.(py|md|proto|yml|toml|sh|ini)$", token)):
                continue  # not a file or folder (`storage/db.classify` names a function)
            if not any((ROOT / (base + token.rstrip("/"))).exists() for base in _BASES):
                dangling.append(f"{doc.relative_to(ROOT)}: {token}")
    assert not dangling, "the docs name files that do not exist:\n" + "\n".join(dangling)
