"""jobs_client: the library backend services import to submit and follow video jobs.

Async first (`JobsClient`), with a small blocking facade (`SyncJobsClient`). It depends on the
generated protos and grpc only, never on the job-service's or the worker's code.
"""

from jobs_client.client import CallRetry, JobsClient, UploadProgress
from jobs_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    JobsError,
    NotFound,
    Unavailable,
    UploadFailed,
    error_code_name,
)
from jobs_client.sync import SyncJobsClient

__all__ = [
    "AlreadyExists",
    "CallRetry",
    "FailedPrecondition",
    "InvalidArgument",
    "JobFailed",
    "JobsClient",
    "JobsError",
    "NotFound",
    "SyncJobsClient",
    "Unavailable",
    "UploadFailed",
    "UploadProgress",
    "error_code_name",
]
