"""Every kind of domain error has its gRPC status in the one map (job_service/rpc/errors.py):
a new ErrorKind without one would surface as INTERNAL at the first error of that kind."""

from __future__ import annotations

import grpc

from job_service.domain.errors import ErrorKind
from job_service.rpc.errors import STATUS_OF


def test_every_error_kind_maps_to_a_status() -> None:
    assert set(STATUS_OF) == set(ErrorKind)
    assert grpc.StatusCode.INTERNAL not in STATUS_OF.values()  # INTERNAL is for our bugs only
    assert grpc.StatusCode.UNKNOWN not in STATUS_OF.values()
