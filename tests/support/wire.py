"""Facts about the wire contract (protos/jobs/v1/jobs.proto) that the .proto cannot state, for
everything that speaks it: the services, the client, scripts and tests.

- `TERMINAL_STATUSES`: the JobStatus values a job never leaves by itself (the job-service's
  `job_service.domain.status.TERMINAL`, on the wire; a unit test keeps the two equal).
- `error_code()`: the stored `JobError.code` string of an `ErrorCode` enum value, so nobody types
  "CANCELLED" by hand.
- `duration()`: a google.protobuf.Duration from seconds or a timedelta.
"""

from __future__ import annotations

from datetime import timedelta

from google.protobuf import duration_pb2
from jobs.v1 import jobs_pb2

TERMINAL_STATUSES: frozenset[jobs_pb2.JobStatus.ValueType] = frozenset(
    {jobs_pb2.JOB_STATUS_DONE, jobs_pb2.JOB_STATUS_FAILED}
)

_CODE_PREFIX = "ERROR_CODE_"


def error_code(value: jobs_pb2.ErrorCode.ValueType) -> str:
    """`ERROR_CODE_CANCELLED` -> "CANCELLED"; ValueError for UNSPECIFIED or an unknown number."""
    if value == jobs_pb2.ERROR_CODE_UNSPECIFIED:
        raise ValueError("ERROR_CODE_UNSPECIFIED is not a stored code")
    return jobs_pb2.ErrorCode.Name(value).removeprefix(_CODE_PREFIX)


#: Every stored code the contract defines.
ERROR_CODES: frozenset[str] = frozenset(
    error_code(value) for value in jobs_pb2.ErrorCode.values() if value
)


def duration(value: timedelta | float) -> duration_pb2.Duration:
    """A Duration message: a timedelta exactly, float seconds to the nanosecond (truncated)."""
    out = duration_pb2.Duration()
    if isinstance(value, timedelta):
        out.FromTimedelta(value)
    else:
        out.FromNanoseconds(int(value * 1_000_000_000))
    return out
