"""The README's configuration tables name exactly the variables the code reads, with their
defaults, and the Makefile targets it mentions exist."""

from __future__ import annotations

import re
from pathlib import Path

from analysis_worker import config as worker_config
from job_service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def rows() -> dict[str, str]:
    """variable -> its table row."""
    out: dict[str, str] = {}
    for line in README.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`((?:JOB_SERVICE|ANALYSIS_WORKER)_[A-Z0-9_]+)`", line):
                out[name] = line
    return out


def test_every_variable_the_code_reads_is_documented_with_its_default():
    table = rows()
    for name, default in [*Settings.env_table(), *worker_config.env_table()]:
        assert name in table, f"{name} missing from the README"
        if default and name != "ANALYSIS_WORKER_WORKER_ID":
            assert f"`{default}`" in table[name] or default in table[name], (name, default)


def test_the_readme_names_no_variable_the_code_does_not_read():
    known = {n for n, _ in [*Settings.env_table(), *worker_config.env_table()]}
    named = set(re.findall(r"\b((?:JOB_SERVICE|ANALYSIS_WORKER)_[A-Z0-9_]+)\b", README))
    assert named - known == set()


def test_make_targets_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    for target in set(re.findall(r"`?make ([a-z-]+)", README)):
        assert target in targets, target
