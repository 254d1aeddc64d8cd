"""Facts about the wire contract (protos/jobs/v1/jobs.proto) that the .proto cannot state, for
the tests. (The terminal statuses on the wire are jobs_client.client.TERMINAL.)

- `error_code()`: the stored `JobError.code` string of an `ErrorCode` enum value, so nobody types
  "CANCELLED" by hand.
"""

from __future__ import annotations

from jobs.v1 import jobs_pb2

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
