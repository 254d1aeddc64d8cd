"""Error codes stored on jobs (`JobError.code`, sent as `JobError.code` on the wire): data, not
exceptions.

The vocabulary is the proto enum `jobs.v1.ErrorCode`: the stored code is the enum name without
its `ERROR_CODE_` prefix (tests/support/wire.py error_code()). These plain constants keep the
domain free of generated code; tests/unit/domain/test_codes.py checks them against the enum
both ways, so a code added to the proto must be added here (and the other way round).
"""

from __future__ import annotations

# Upload verification (CompleteUpload, the upload reconciler): upload again and call
# CompleteUpload to recover.
UPLOAD_OBJECT_NOT_FOUND = "UPLOAD_OBJECT_NOT_FOUND"
UPLOAD_EMPTY = "UPLOAD_EMPTY"
UPLOAD_SIZE_MISMATCH = "UPLOAD_SIZE_MISMATCH"
UPLOAD_CONTENT_TYPE_MISMATCH = "UPLOAD_CONTENT_TYPE_MISMATCH"
#: The upload URL expired and no object arrived (found by the upload reconciler).
UPLOAD_EXPIRED = "UPLOAD_EXPIRED"
#: The stored object's checksum is not the one declared at InitiateUpload.
UPLOAD_CHECKSUM_MISMATCH = "UPLOAD_CHECKSUM_MISMATCH"

# Reported by workers (FailJob.error_code).
UPLOAD_MISSING = "UPLOAD_MISSING"
UPLOAD_CHANGED = "UPLOAD_CHANGED"
DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
STORAGE_ACCESS_DENIED = "STORAGE_ACCESS_DENIED"
RESULTS_UPLOAD_FAILED = "RESULTS_UPLOAD_FAILED"
INVALID_MEDIA = "INVALID_MEDIA"
MEDIA_IO = "MEDIA_IO"
ANALYSIS_ERROR = "ANALYSIS_ERROR"
ANALYSIS_FAILED = "ANALYSIS_FAILED"
JOB_SERVICE_ERROR = "JOB_SERVICE_ERROR"
LEASE_OUT_OF_BOUNDS = "LEASE_OUT_OF_BOUNDS"

# Set by the job-service.
CANCELLED = "CANCELLED"
LEASE_EXPIRED = "LEASE_EXPIRED"
#: Infrastructure trouble lasted past the service's infrastructure retry window.
INFRASTRUCTURE_UNAVAILABLE = "INFRASTRUCTURE_UNAVAILABLE"

#: Failures CompleteUpload may verify again (Job.upload_failed).
UPLOAD_ERROR_CODES = frozenset(
    {
        UPLOAD_OBJECT_NOT_FOUND,
        UPLOAD_EMPTY,
        UPLOAD_SIZE_MISMATCH,
        UPLOAD_CONTENT_TYPE_MISMATCH,
        UPLOAD_EXPIRED,
        UPLOAD_CHECKSUM_MISMATCH,
    }
)

#: Every code above, once.
ALL: frozenset[str] = frozenset(
    value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str)
)
