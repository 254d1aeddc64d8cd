"""The job error codes the worker sends, named once: taken from the proto's `ErrorCode` enum.

`FailJobRequest.error_code` stays a string on the wire (plug-in analyzers bring codes of their
own), and the string is the enum value's name without its `ERROR_CODE_` prefix. Deriving the
constants from the generated enum means a code the worker sends is a code the service knows, and
a typo is an import-time KeyError rather than a job failed with a code nobody recognises.
"""

from __future__ import annotations

from jobs.v1 import jobs_pb2

_PREFIX = "ERROR_CODE_"


def code_name(value: jobs_pb2.ErrorCode.ValueType) -> str:
    """The wire string of an ErrorCode value (ERROR_CODE_INVALID_MEDIA -> "INVALID_MEDIA")."""
    return jobs_pb2.ErrorCode.Name(value).removeprefix(_PREFIX)


def is_known(code: str) -> bool:
    """Whether `code` is one of the proto's ErrorCode names (plug-in codes are not)."""
    return code != "UNSPECIFIED" and _PREFIX + code in jobs_pb2.ErrorCode.keys()


# ObjectStore (analysis_worker.object_store).
UPLOAD_MISSING = code_name(jobs_pb2.ERROR_CODE_UPLOAD_MISSING)
UPLOAD_CHANGED = code_name(jobs_pb2.ERROR_CODE_UPLOAD_CHANGED)
DOWNLOAD_FAILED = code_name(jobs_pb2.ERROR_CODE_DOWNLOAD_FAILED)
STORAGE_ACCESS_DENIED = code_name(jobs_pb2.ERROR_CODE_STORAGE_ACCESS_DENIED)
RESULTS_UPLOAD_FAILED = code_name(jobs_pb2.ERROR_CODE_RESULTS_UPLOAD_FAILED)
# The pipeline (analysis_worker.runner).
ANALYSIS_ERROR = code_name(jobs_pb2.ERROR_CODE_ANALYSIS_ERROR)
JOB_SERVICE_ERROR = code_name(jobs_pb2.ERROR_CODE_JOB_SERVICE_ERROR)
CANCELLED = code_name(jobs_pb2.ERROR_CODE_CANCELLED)
# Security: a lease pointing outside the worker's bucket/prefixes.
LEASE_OUT_OF_BOUNDS = code_name(jobs_pb2.ERROR_CODE_LEASE_OUT_OF_BOUNDS)
