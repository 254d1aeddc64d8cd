"""Error codes the worker sends are named once, from the proto's ErrorCode enum."""

from __future__ import annotations

import ast
from pathlib import Path

from jobs.v1 import jobs_pb2

import analysis_worker
from analysis_worker import codes
from analysis_worker.analysis import AnalysisError, InvalidMediaError, MediaIOError

PACKAGE = Path(analysis_worker.__file__).parent
WIRE_NAMES = {name.removeprefix("ERROR_CODE_") for name in jobs_pb2.ErrorCode.keys()} - {
    "UNSPECIFIED"
}


def test_every_worker_code_is_an_error_code_of_the_proto() -> None:
    constants = {
        name: value for name, value in vars(codes).items() if name.isupper() and name[0] != "_"
    }
    assert len(constants) >= 8
    assert {name: value for name, value in constants.items() if name != value} == {}
    assert set(constants.values()) <= WIRE_NAMES
    assert all(codes.is_known(value) for value in constants.values())
    assert not codes.is_known("FLAKY_ANALYSIS") and not codes.is_known("UNSPECIFIED")


def test_the_analysis_package_codes_are_error_codes_too() -> None:
    # analysis/ may not import the protos (import-linter), so its codes are checked here.
    for error in (AnalysisError, InvalidMediaError, MediaIOError):
        assert error.code in WIRE_NAMES, error


def test_no_module_outside_codes_types_a_wire_code_by_hand() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "codes.py" or "analysis" in path.relative_to(PACKAGE).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in WIRE_NAMES:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value}")
    assert offenders == []
