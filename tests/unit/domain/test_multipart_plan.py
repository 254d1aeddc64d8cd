"""The multipart plan and the checksum verdicts are pure: every S3 limit in one place."""

from __future__ import annotations

import base64
import hashlib
import math
import uuid
from datetime import UTC, datetime

import pytest

from job_service.domain.model import Job, JobId, ObjectInfo, SessionId
from job_service.domain.multipart import (
    S3_MAX_OBJECT_BYTES,
    GiB,
    MiB,
    PartInfo,
    check_parts,
    composite_sha256,
    expected_checksum,
    plan_parts,
    verify_checksum,
)
from job_service.domain.status import JobStatus


@pytest.mark.parametrize(
    "size",
    [1, 5 * MiB, 16 * MiB, 16 * MiB + 1, 200 * MiB, 160_000 * MiB, 160_000 * MiB + 1, 5 * GiB,
     S3_MAX_OBJECT_BYTES],
)  # fmt: skip
def test_plans_obey_s3s_rules(size):
    plan = plan_parts(size, preferred=16 * MiB)
    assert plan.part_size == max(16 * MiB, math.ceil(size / 10_000))
    assert 5 * MiB <= plan.part_size <= 5 * GiB
    assert 1 <= plan.part_count <= 10_000
    assert plan.part_size * (plan.part_count - 1) < size <= plan.part_size * plan.part_count
    assert sum(plan.size_of(n, size) for n in range(1, plan.part_count + 1)) == size


def test_the_floor_is_s3s_minimum_unless_a_test_backend_lowers_it():
    assert plan_parts(100 * MiB, preferred=1 * MiB).part_size == 5 * MiB
    assert plan_parts(10_000, preferred=1024, floor=1024).part_count == 10


def job(**kw) -> Job:
    now = datetime.now(UTC)
    values = dict(
        id=JobId(uuid.uuid4()), session_id=SessionId(uuid.uuid4()),
        status=JobStatus.awaiting_upload, progress_pct=0, filename="a.mp4",
        content_type="video/mp4", size_bytes=12 * MiB, bucket="b", key="k", request_id=None,
        attempts=0, max_attempts=5, created_at=now, updated_at=now, available_at=now,
    )  # fmt: skip
    values.update(kw)
    return Job(**values)  # type: ignore[arg-type]


def test_composite_checksum_and_part_checks():
    parts = [b"a" * 5, b"b" * 5, b"c" * 2]
    digests = [hashlib.sha256(p).digest() for p in parts]
    expected = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode() + "-3"
    assert composite_sha256(digests) == expected
    j = job(size_bytes=12, part_size=5, part_count=3)
    listed = [
        PartInfo(n, len(p), "e", d) for n, (p, d) in enumerate(zip(parts, digests, strict=True), 1)
    ]
    assert check_parts(j, listed) == []
    assert expected_checksum(j, listed) == expected
    assert check_parts(j, listed[:2]) == ["1 of 3 parts are missing (3)"]
    short = [*listed[:2], PartInfo(3, 1, "e", digests[2])]
    assert check_parts(j, short) == ["part 3 has 1 bytes, expected 2: upload it again"]
    unsigned = [*listed[:2], PartInfo(3, 2, "e", None)]
    assert "never signed" in check_parts(j, unsigned)[0]
    ok = ObjectInfo(12, "x-3", "video/mp4", expected)
    assert verify_checksum(j, ok, expected) is None
    moto = ObjectInfo(12, "x-3", "video/mp4", expected.split("-")[0])  # moto drops the -N
    assert verify_checksum(j, moto, expected) is None
    wrong = verify_checksum(j, ObjectInfo(12, "x-3", "video/mp4", "AAAA-3"), expected)
    assert wrong is not None and wrong.code == "UPLOAD_CHECKSUM_MISMATCH"
    parts_off = verify_checksum(j, ObjectInfo(12, "x-2", "video/mp4", expected), expected)
    assert parts_off is not None and "2 part(s)" in parts_off.message


def test_single_put_checksum_verdicts():
    digest = hashlib.sha256(b"video").digest()
    j = job(sha256=digest)
    b64 = base64.b64encode(digest).decode()
    assert expected_checksum(j, None) == b64
    assert verify_checksum(j, ObjectInfo(1, "e", None, b64), b64) is None
    missing = verify_checksum(j, ObjectInfo(1, "e", None, None), b64)
    assert missing is not None and missing.code == "UPLOAD_CHECKSUM_MISMATCH"
    assert expected_checksum(job(), None) is None  # nothing declared: nothing compared
