"""The domain's stored error codes and terminal statuses against the wire contract, both ways."""

from __future__ import annotations

from jobs.v1 import jobs_pb2 as pb

from job_service.domain import codes
from job_service.domain.status import TERMINAL, TRANSITIONS, JobStatus
from job_service.rpc.convert import status_to_pb

PREFIX = "ERROR_CODE_"
PROTO_CODES = {name.removeprefix(PREFIX) for name, value in pb.ErrorCode.items() if value != 0}


def test_every_proto_error_code_is_a_domain_code_and_back() -> None:
    missing_here = PROTO_CODES - codes.ALL
    missing_in_proto = codes.ALL - PROTO_CODES
    assert not missing_here, f"add to job_service/domain/codes.py: {sorted(missing_here)}"
    assert not missing_in_proto, f"add ERROR_CODE_<name> to jobs.proto: {sorted(missing_in_proto)}"


def test_each_constant_is_named_after_its_value() -> None:
    constants = {
        name: value
        for name, value in vars(codes).items()
        if isinstance(value, str) and name.isupper()
    }
    assert constants and all(name == value for name, value in constants.items())
    assert set(constants.values()) == codes.ALL
    assert codes.UPLOAD_ERROR_CODES <= codes.ALL


def test_the_terminal_statuses_on_the_wire_are_the_domains() -> None:
    assert {status_to_pb(s) for s in TERMINAL} == {pb.JOB_STATUS_DONE, pb.JOB_STATUS_FAILED}
    # Terminal means: no edge out but the operator's redrive (failed -> queued).
    assert {s for s in JobStatus if TRANSITIONS[s] <= {JobStatus.queued}} == TERMINAL
