"""Multipart plans and checksum verdicts: the pure half of large, checksummed uploads.

S3's rules: parts of 5 MiB-5 GiB (the last may be smaller), part numbers 1..10,000, objects up to
5 TiB, a single PUT up to 5 GiB. The service chooses the part size, so a client cannot make an
upload of 10,001 parts or of parts S3 refuses at completion.

Checksums: S3 keeps SHA-256 checksums in base64. A single PUT's checksum is the SHA-256 of the
object; a multipart object's is COMPOSITE, `b64(sha256(d1 || d2 || ... || dN))-N` over the
parts' binary digests (no full-object SHA-256 exists for multipart). No I/O here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
from collections.abc import Sequence

from job_service.domain import codes, errors
from job_service.domain.model import Job, JobError, ObjectInfo

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
#: S3's largest object, and its largest single PUT.
S3_MAX_OBJECT_BYTES = 5 * TiB
S3_MAX_PUT_BYTES = 5 * GiB
S3_MAX_PARTS = 10_000
S3_MIN_PART_BYTES = 5 * MiB
S3_MAX_PART_BYTES = 5 * GiB
SHA256_BYTES = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    part_size: int
    part_count: int

    def size_of(self, part_number: int, total: int) -> int:
        """Bytes part `part_number` must have (the last one holds the rest)."""
        if part_number < self.part_count:
            return self.part_size
        return total - self.part_size * (self.part_count - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class PartInfo:
    """One part as S3 lists it (ListParts), with the SHA-256 its URL was signed with."""

    part_number: int
    size: int
    etag: str
    sha256: bytes | None = None


def plan_parts(size: int, *, preferred: int, floor: int = S3_MIN_PART_BYTES) -> Plan:
    """part_size = max(preferred, ceil(size / 10000), floor): at most 10,000 parts, each at least
    S3's minimum (`floor` is lowered only for test backends)."""
    part_size = max(preferred, math.ceil(size / S3_MAX_PARTS), floor)
    part_size = min(part_size, S3_MAX_PART_BYTES)
    count = max(1, math.ceil(size / part_size))
    assert count <= S3_MAX_PARTS, (size, part_size)
    return Plan(part_size, count)


def plan_of(job: Job) -> Plan:
    assert job.part_size is not None and job.part_count is not None
    return Plan(job.part_size, job.part_count)


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def composite_sha256(digests: Sequence[bytes]) -> str:
    """S3's COMPOSITE checksum of a multipart object from its parts' SHA-256 digests."""
    return f"{b64(hashlib.sha256(b''.join(digests)).digest())}-{len(digests)}"


def same_checksum(stored: str, expected: str) -> bool:
    """Compare S3 checksums; moto reports a composite without its `-N` suffix."""
    return stored.split("-")[0] == expected.split("-")[0]


def validate_sha256(field: str, value: bytes, *, required: bool = False) -> bytes | None:
    if not value:
        if required:
            raise errors.InvalidArgument(field, "is required: the SHA-256 (32 bytes) of the data")
        return None
    if len(value) != SHA256_BYTES:
        raise errors.InvalidArgument(
            field, f"must be a SHA-256 digest of {SHA256_BYTES} bytes, got {len(value)} bytes"
        )
    return value


def check_parts(job: Job, listed: Sequence[PartInfo]) -> list[str]:
    """What stops S3's list of parts from becoming the promised object: missing parts, parts of
    the wrong size, parts uploaded without a signed checksum. Empty when it is complete."""
    plan = plan_of(job)
    have = {p.part_number: p for p in listed}
    problems: list[str] = []
    missing = [n for n in range(1, plan.part_count + 1) if n not in have]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(f"{len(missing)} of {plan.part_count} parts are missing ({shown})")
    for n, part in sorted(have.items()):
        if n > plan.part_count:
            problems.append(f"part {n} is beyond the plan's {plan.part_count} parts")
            continue
        want = plan.size_of(n, job.size_bytes)
        if part.size != want:
            problems.append(f"part {n} has {part.size} bytes, expected {want}: upload it again")
        if part.sha256 is None:
            problems.append(f"part {n} was never signed by SignUploadParts: sign and upload it")
    return problems


def expected_checksum(job: Job, parts: Sequence[PartInfo] | None) -> str | None:
    """The checksum the stored object must carry: the declared SHA-256 for a single PUT, the
    composite of the signed part checksums for multipart (None: nothing to compare)."""
    if not job.multipart:
        return b64(job.sha256) if job.sha256 else None
    if not parts:
        return None
    digests = [p.sha256 for p in sorted(parts, key=lambda p: p.part_number)]
    if any(d is None for d in digests):
        return None
    return composite_sha256([d for d in digests if d is not None])


def verify_checksum(job: Job, obj: ObjectInfo, expected: str | None) -> JobError | None:
    """The checksum half of the preflight (after size and type passed)."""
    if job.multipart:
        count = obj.etag.rpartition("-")[2] if "-" in obj.etag else "1"
        if count != str(job.part_count):
            return JobError(
                codes.UPLOAD_SIZE_MISMATCH,
                f"the object has {count} part(s) but the upload plan has {job.part_count}; "
                "upload the parts again and call CompleteUpload",
            )
    if expected is None:
        return None
    if obj.checksum_sha256 is None:
        return JobError(
            codes.UPLOAD_CHECKSUM_MISMATCH,
            f"the object at s3://{job.bucket}/{job.key} carries no SHA-256 checksum, so it was "
            "not uploaded with the signed URL; upload it again with exactly the returned headers",
        )
    if not same_checksum(obj.checksum_sha256, expected):
        return JobError(
            codes.UPLOAD_CHECKSUM_MISMATCH,
            f"the object's SHA-256 ({obj.checksum_sha256}) is not the one declared "
            f"({expected}); upload the right file again, then call CompleteUpload",
        )
    return None


class UploadIncomplete(errors.JobServiceError):
    """A multipart upload cannot be completed yet; the job was not changed."""

    kind = errors.ErrorKind.FAILED_PRECONDITION
    reason = "UPLOAD_INCOMPLETE"


class NotMultipart(errors.JobServiceError):
    """A multipart call on a single-PUT job."""

    kind = errors.ErrorKind.FAILED_PRECONDITION
    reason = "UPLOAD_NOT_MULTIPART"


class UploadClosed(errors.JobServiceError):
    """The job no longer takes uploads (it left awaiting_upload)."""

    kind = errors.ErrorKind.FAILED_PRECONDITION
    reason = "UPLOAD_CLOSED"
