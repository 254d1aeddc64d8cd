"""The contract checks catch what they exist for. Each test copies protos/ to a temporary
directory, makes one change, and runs the pinned buf (`make buf-path`) the way `make contract`
does: renumbering, retyping or renaming a field, removing an RPC, and removing a field without
reserving it fail `buf breaking` against the committed baseline, each with the rule that names
the break; adding a field or an RPC, and removing a field whose number and name are reserved,
pass both `buf breaking` and `buf lint`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "protos" / "baseline" / "jobs.v1.binpb"
PROTO = Path("jobs") / "v1" / "jobs.proto"

CANCEL_REQUESTED = """\
  // Set by AdminService.CancelJob on a running job; the worker sees it in its heartbeat.
  bool cancel_requested = 20;
"""
RELEASE_RPC = "  rpc ReleaseJob(ReleaseJobRequest) returns (ReleaseJobResponse);\n"
PING_RPC = "  rpc Ping(PingRequest) returns (PingResponse);\n"
PING_MESSAGES = "\nmessage PingRequest {}\n\nmessage PingResponse {\n  string version = 1;\n}\n"


@pytest.fixture(scope="module")
def buf() -> str:
    """The Makefile's pinned buf, installed from the npm registry on first use."""
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "buf-path"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, f"`make buf-path` failed (needs npm):\n{out.stdout}{out.stderr}"
    return out.stdout.strip().splitlines()[-1]


def copy_of_protos(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """protos/jobs and protos/buf.yaml under tmp_path, with each (old, new) replaced once."""
    root = tmp_path / "protos"
    shutil.copytree(ROOT / "protos" / "jobs", root / "jobs")
    shutil.copy(ROOT / "protos" / "buf.yaml", root / "buf.yaml")
    text = (root / PROTO).read_text()
    for old, new in edits:
        assert text.count(old) == 1, f"the mutation expects exactly one {old!r} in jobs.proto"
        text = text.replace(old, new)
    (root / PROTO).write_text(text)
    return root


def breaking(buf: str, protos: Path) -> tuple[int, set[str], str]:
    """(exit code, the rules buf reports, its messages) for `buf breaking` against the baseline."""
    out = subprocess.run(
        [buf, "breaking", str(protos), "--against", str(BASELINE), "--error-format=json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    found = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return out.returncode, {f["type"] for f in found}, out.stdout + out.stderr


def lint(buf: str, protos: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf, "lint", str(protos)], capture_output=True, text=True, timeout=60)


def test_the_unchanged_protos_pass_both_checks(buf: str, tmp_path: Path) -> None:
    protos = copy_of_protos(tmp_path)
    code, rules, text = breaking(buf, protos)
    assert (code, rules) == (0, set()), text
    linted = lint(buf, protos)
    assert linted.returncode == 0, linted.stdout + linted.stderr


PROGRESS = "  int32 progress_pct = 5;\n  // The last"
RELEASE_RESPONSE = "message ReleaseJobResponse {\n  Job job = 1;\n}\n"

#: (the edit, a rule buf must report for it), one per kind of break.
BREAKING = {
    "renumber-a-field": (
        ("  string filename = 9;", "  string filename = 99;"),
        "FIELD_NO_DELETE_UNLESS_NUMBER_RESERVED",
    ),
    "change-a-field-type": (
        (PROGRESS, PROGRESS.replace("int32", "string")),
        "FIELD_SAME_TYPE",
    ),
    "remove-an-rpc": ((RELEASE_RPC, ""), "RPC_NO_DELETE"),
    "remove-a-field-without-reserving-it": (
        (CANCEL_REQUESTED, ""),
        "FIELD_NO_DELETE_UNLESS_NAME_RESERVED",
    ),
    "rename-a-field": (
        ("  string filename = 9;", "  string file_name = 9;"),
        "FIELD_SAME_NAME",
    ),
}

#: The edits of changes that keep old callers working.
ADDITIVE = {
    "add-a-field": [(CANCEL_REQUESTED, CANCEL_REQUESTED + "  // A note.\n  string note = 99;\n")],
    "add-an-rpc": [
        (RELEASE_RPC, RELEASE_RPC + PING_RPC),
        (RELEASE_RESPONSE, RELEASE_RESPONSE + PING_MESSAGES),
    ],
    "remove-a-field-reserving-its-number-and-name": [
        (CANCEL_REQUESTED, '  reserved 20;\n  reserved "cancel_requested";\n')
    ],
}


@pytest.mark.parametrize(("edit", "rule"), BREAKING.values(), ids=BREAKING.keys())
def test_a_breaking_change_fails(
    buf: str, tmp_path: Path, edit: tuple[str, str], rule: str
) -> None:
    code, rules, text = breaking(buf, copy_of_protos(tmp_path, edit))
    assert code != 0, f"buf breaking accepted the change:\n{text}"
    assert rule in rules, text


@pytest.mark.parametrize("edits", ADDITIVE.values(), ids=ADDITIVE.keys())
def test_an_additive_change_passes(buf: str, tmp_path: Path, edits: list[tuple[str, str]]) -> None:
    protos = copy_of_protos(tmp_path, *edits)
    code, rules, text = breaking(buf, protos)
    assert (code, rules) == (0, set()), text
    linted = lint(buf, protos)
    assert linted.returncode == 0, linted.stdout + linted.stderr
