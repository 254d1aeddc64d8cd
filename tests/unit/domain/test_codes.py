"""The domain's stored error codes and terminal statuses against the wire contract, both ways."""

from __future__ import annotations

import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.domain import codes
from job_service.domain.status import TERMINAL, TRANSITIONS, JobStatus
from job_service.rpc.convert import status_to_pb
from jobs_client import client
from tests.support import wire


def test_every_proto_error_code_is_a_domain_code_and_back() -> None:
    missing_here = wire.ERROR_CODES - codes.ALL
    missing_in_proto = codes.ALL - wire.ERROR_CODES
    assert not missing_here, f"add to job_service/domain/codes.py: {sorted(missing_here)}"
    assert not missing_in_proto, f"add ERROR_CODE_<name> to jobs.proto: {sorted(missing_in_proto)}"


def test_each_constant_is_named_after_its_value() -> None:
    constants = {name: value for name, value in vars(codes).items() if isinstance(value, str)}
    constants = {k: v for k, v in constants.items() if k.isupper()}
    assert constants and all(name == value for name, value in constants.items())
    assert codes.UPLOAD_ERROR_CODES <= codes.ALL


def test_error_code_names_a_proto_value() -> None:
    assert wire.error_code(pb.ERROR_CODE_CANCELLED) == codes.CANCELLED
    assert wire.error_code(pb.ERROR_CODE_UPLOAD_EXPIRED) == codes.UPLOAD_EXPIRED
    with pytest.raises(ValueError):
        wire.error_code(pb.ERROR_CODE_UNSPECIFIED)
    with pytest.raises(ValueError):
        wire.error_code(9999)  # type: ignore[arg-type]


def test_the_terminal_statuses_are_one_set_on_both_sides() -> None:
    # The client library's set (what cli, demo and the e2e tests use) is the domain's.
    assert {status_to_pb(s) for s in TERMINAL} == client.TERMINAL
    # Terminal means: no edge out but the operator's redrive (failed -> queued).
    assert {s for s in JobStatus if TRANSITIONS[s] <= {JobStatus.queued}} == TERMINAL
