"""jobs_client: the library backend services import to submit and follow video jobs, and
workers import to claim and finish them.

Async first (`JobsClient`, `WorkerClient`), with a small blocking facade (`SyncJobsClient`). It
depends on the generated protos and grpc only, never on the job-service's or the worker's code:
`pip install verified-upload-jobs` (no extras) is all a backend service needs.
"""

from jobs_client.client import JobsClient
from jobs_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    JobsError,
    LeaseLost,
    NotFound,
    Unavailable,
    UploadFailed,
    error_code_name,
)
from jobs_client.retry import Backoff
from jobs_client.sync import SyncJobsClient
from jobs_client.upload_progress import UploadProgress
from jobs_client.worker import WorkerClient

__all__ = [
    "AlreadyExists",
    "Backoff",
    "FailedPrecondition",
    "InvalidArgument",
    "JobFailed",
    "JobsClient",
    "JobsError",
    "LeaseLost",
    "NotFound",
    "SyncJobsClient",
    "Unavailable",
    "UploadFailed",
    "UploadProgress",
    "WorkerClient",
    "error_code_name",
]
