"""The worker re-hashes what it downloads against the SHA-256 the uploader declared (issue 9 §2).

`Lease.sha256` carries the raw 32-byte digest (empty when none was declared). The download
hashes the chunks as it writes them; a mismatch is UPLOAD_CHANGED, final, a job failure
(FAILURE_KIND_JOB) that is reported before any analysis and is never followed by CompleteJob.
The objects are real ones in moto's S3 server, multipart among them: S3 holds no whole-object
SHA-256 for those, so this check is the only one over the whole file.
"""

from __future__ import annotations

import hashlib
import threading
import types
import uuid
from pathlib import Path

import pytest
from jobs.v1 import jobs_pb2

from analysis_worker import codes, object_store
from analysis_worker.object_store import ObjectStore, ObjectStoreError
from tests.support.analyzers import GatedAnalyzer, SyntheticAnalyzer, recorded_calls
from tests.support.worker_service import BUCKET, Harness, RunningWorker

MIB = 1024 * 1024
JOB = jobs_pb2.FAILURE_KIND_JOB


def sample(size: int) -> bytes:
    """Bytes that differ from chunk to chunk, so a hash of one chunk is no hash of another."""
    return b"".join(i.to_bytes(4, "big") for i in range(size // 4 + 1))[:size]


async def multipart_lease(h: Harness, data: bytes, part_size: int = 5 * MIB) -> jobs_pb2.Lease:
    """A lease on an object uploaded in parts (S3's minimum part size, 5 MiB, but the last)."""
    lease = await h.lease()
    key = f"uploads/{uuid.uuid4()}.mp4"
    created = await h.s3.create_multipart_upload(Bucket=BUCKET, Key=key)
    parts = []
    for number, start in enumerate(range(0, len(data), part_size), start=1):
        part = await h.s3.upload_part(
            Bucket=BUCKET,
            Key=key,
            UploadId=created["UploadId"],
            PartNumber=number,
            Body=data[start : start + part_size],
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    done = await h.s3.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=created["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert done["ETag"].strip('"').endswith(f"-{len(parts)}")  # really a multipart object
    lease.key = lease.job.key = key
    lease.etag = done["ETag"]
    lease.size_bytes = len(data)
    return lease


# -- ObjectStore ---------------------------------------------------------------------------------


async def test_multipart_object_matching_its_declared_digest_downloads(
    harness: Harness, tmp_path: Path
) -> None:
    data = sample(5 * MIB + 123_457)
    lease = await multipart_lease(harness, data)
    lease.sha256 = hashlib.sha256(data).digest()
    dest = tmp_path / "video.mp4"
    # Chunks that do not divide the parts: the digest must cover every chunk, in order.
    written = await ObjectStore(harness.s3, chunk_bytes=300_001).download(lease, dest)
    assert written == len(data)
    assert dest.read_bytes() == data


async def test_wrong_declared_digest_is_upload_changed(harness: Harness, tmp_path: Path) -> None:
    data = sample(5 * MIB + 4096)
    lease = await multipart_lease(harness, data)
    # Same size, same ETag (If-Match passes): only the declared whole-file digest disagrees,
    # as when the parts a client uploaded were not the file it declared.
    declared = hashlib.sha256(data[:-1] + b"\x00").digest()
    lease.sha256 = declared
    with pytest.raises(ObjectStoreError) as caught:
        await ObjectStore(harness.s3).download(lease, tmp_path / "v")
    error = caught.value
    assert (error.code, error.retryable) == (codes.UPLOAD_CHANGED, False)
    assert not error.infrastructure  # FailJob kind JOB: it spends an attempt, ends the job
    assert f"s3://{BUCKET}/{lease.key}" in error.message
    assert hashlib.sha256(data).hexdigest() in error.message
    assert declared.hex() in error.message


async def test_single_put_object_with_a_wrong_digest_is_upload_changed(
    harness: Harness, tmp_path: Path
) -> None:
    lease = await harness.lease(data=sample(64 * 1024))
    lease.sha256 = hashlib.sha256(b"another file").digest()
    with pytest.raises(ObjectStoreError) as caught:
        await ObjectStore(harness.s3, chunk_bytes=8192).download(lease, tmp_path / "v")
    assert (caught.value.code, caught.value.retryable) == (codes.UPLOAD_CHANGED, False)


async def test_no_declared_digest_skips_the_check(harness: Harness, tmp_path: Path) -> None:
    data = sample(200_000)
    lease = await harness.lease(data=data)
    assert lease.sha256 == b""
    dest = tmp_path / "v"
    assert await ObjectStore(harness.s3, chunk_bytes=65_536).download(lease, dest) == len(data)
    assert dest.read_bytes() == data


class RecordingSha256:
    """hashlib.sha256, recording the thread and size of every update."""

    def __init__(self, updates: list[tuple[int, int]]) -> None:
        self._inner = hashlib.sha256()
        self._updates = updates

    def update(self, data: bytes) -> None:
        self._updates.append((threading.get_ident(), len(data)))
        self._inner.update(data)

    def digest(self) -> bytes:
        return self._inner.digest()


async def test_chunks_are_hashed_once_each_off_the_event_loop(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = sample(256 * 1024)
    lease = await harness.lease(data=data)
    lease.sha256 = hashlib.sha256(data).digest()
    updates: list[tuple[int, int]] = []
    fake_hashlib = types.SimpleNamespace(sha256=lambda: RecordingSha256(updates))
    monkeypatch.setattr(object_store, "hashlib", fake_hashlib)
    await ObjectStore(harness.s3, chunk_bytes=16 * 1024).download(lease, tmp_path / "v")
    # Every byte hashed exactly once, chunk by chunk (no second pass over the file)...
    assert sum(size for _, size in updates) == len(data)
    assert len(updates) >= len(data) // (16 * 1024) and max(s for _, s in updates) <= 16 * 1024
    # ...and never on the event loop's thread.
    assert threading.get_ident() not in {thread for thread, _ in updates}


# -- Through the worker (real Worker and JobRunner, the fake WorkerService over gRPC) ---------


def metric(running: RunningWorker, name: str, **labels: str) -> float:
    return running.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_wrong_digest_fails_the_job_upload_changed_without_analysis(
    harness: Harness,
) -> None:
    fake = harness.fake
    data = sample(5 * MIB + 999)
    lease = await multipart_lease(harness, data)
    lease.sha256 = hashlib.sha256(b"what the uploader said it would send").digest()
    job_id = lease.job.job_id
    fake.offer(lease)
    running = harness.start(
        GatedAnalyzer(inner=SyntheticAnalyzer(), gate_dir=harness.gate_dir, max_gate_seconds=10)
    )
    await fake.wait_for(lambda: bool(fake.requests("FailJob")), "FailJob")
    await fake.wait_for(lambda: not running.worker.active_job_ids, "the job to be dropped")

    (fail,) = fake.requests("FailJob")
    assert (fail.error_code, fail.retryable, fail.kind) == (codes.UPLOAD_CHANGED, False, JOB)
    assert fail.lease_token == lease.lease_token
    assert hashlib.sha256(data).hexdigest() in fail.error_message
    assert lease.sha256.hex() in fail.error_message
    assert fake.methods(job_id) == ["FailJob"]  # no progress, no results, no CompleteJob
    assert fake.requests("CompleteJob") == []
    assert recorded_calls(harness.gate_dir) == []  # never analysed
    labels = {"code": codes.UPLOAD_CHANGED, "retryable": "false"}
    assert metric(running, "analysis_worker_jobs_failed_total", **labels) == 1
    assert metric(running, "analysis_worker_storage_retries_total", operation="download") == 0
    assert list(harness.work_dir.iterdir()) == []  # the download is removed


@pytest.mark.parametrize("declared", ["matching", "none"])
async def test_a_matching_or_absent_digest_lets_the_job_complete(
    harness: Harness, declared: str
) -> None:
    fake = harness.fake
    data = sample(300_000)
    lease = await harness.lease(data=data)
    if declared == "matching":
        lease.sha256 = hashlib.sha256(data).digest()
    fake.offer(lease)
    running = harness.start(SyntheticAnalyzer())
    await fake.wait_for(lambda: bool(fake.requests("CompleteJob")), "CompleteJob")
    await fake.wait_for(lambda: not running.worker.active_job_ids, "the job to finish")
    assert fake.requests("FailJob") == []
    assert metric(running, "analysis_worker_jobs_completed_total") == 1


def test_upload_changed_is_a_job_failure_not_infrastructure() -> None:
    assert ObjectStoreError(codes.UPLOAD_CHANGED, "m", retryable=False).infrastructure is False
    assert codes.UPLOAD_CHANGED == "UPLOAD_CHANGED"
    assert codes.is_known(codes.UPLOAD_CHANGED)
    assert codes.UPLOAD_CHANGED not in object_store.INFRASTRUCTURE_CODES
