"""The design note's six cases, and what surrounds them: a job is claimable only after its
upload was verified in S3."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import urllib.request

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.support import auth
from tests.support.flows import (
    VIDEO,
    claim,
    complete,
    error_reason,
    get_job,
    initiate,
    put_object,
    queued_job,
)
from tests.support.service import settings_for, stubs_for


async def test_initiate_creates_job_awaiting_upload(api, settings):
    init = await initiate(api, filename="../../etc/passwd.mp4")
    job = init.job
    assert job.status == pb.JOB_STATUS_AWAITING_UPLOAD
    assert job.stage == "AWAITING_UPLOAD"
    assert job.progress_pct == 0
    # The key is made by the server: the filename cannot steer it out of the uploads prefix.
    assert job.key == f"{settings.s3_upload_prefix}{job.job_id}/source"
    assert ".." not in job.key and "passwd" not in job.key
    assert job.filename == "../../etc/passwd.mp4"
    assert init.upload_url.startswith(settings.s3_endpoint_url)
    assert job.key in init.upload_url and "X-Amz-Signature" in init.upload_url
    assert "content-type" in init.upload_url.lower()  # signed into the URL
    assert dict(init.upload_headers) == {"Content-Type": "video/mp4"}
    assert init.upload_expires_at.seconds > job.created_at.seconds


async def test_job_is_not_claimable_before_complete(api):
    await initiate(api)
    await initiate(api)
    assert await claim(api, max_jobs=10) == []


async def test_complete_moves_job_to_queued(api, moto_s3, app):
    init = await initiate(api)
    await put_object(moto_s3, init.job.bucket, init.job.key)
    job = await complete(api, init.job.job_id)
    assert job.status == pb.JOB_STATUS_QUEUED
    assert job.stage == "QUEUED"
    assert job.etag  # recorded by the preflight, for workers' If-Match
    assert not job.HasField("error")
    async with app.engine.connect() as conn:
        session_status = (
            await conn.execute(
                text("SELECT status FROM video_sessions WHERE id = :id"),
                {"id": job.session_id},
            )
        ).scalar_one()
    assert session_status == "uploaded"


async def test_queued_job_is_claimable(api, moto_s3):
    job = await queued_job(api, moto_s3)
    leases = await claim(api, worker_id="w-7")
    assert len(leases) == 1
    lease = leases[0]
    assert lease.job.job_id == job.job_id
    assert lease.job.status == pb.JOB_STATUS_QUICK_RUNNING
    assert (lease.bucket, lease.key, lease.etag) == (job.bucket, job.key, job.etag)
    assert lease.content_type == "video/mp4" and lease.size_bytes == len(VIDEO)
    assert lease.attempt == 1 and lease.lease_token
    assert lease.lease_expires_at.seconds > 0
    token_hex = lease.lease_token.replace("-", "")
    assert lease.results_prefix == f"results/{job.job_id}/01-{token_hex[:8]}/"  # per lease
    assert await claim(api) == []  # leased: nobody else gets it


async def test_complete_is_idempotent(api, moto_s3, app):
    first = await queued_job(api, moto_s3)
    again = await complete(api, first.job_id)
    assert again.status == pb.JOB_STATUS_QUEUED
    assert again.updated_at == first.updated_at  # nothing changed
    # ... and in every later status too (the design note's table).
    lease = (await claim(api))[0]
    running = await complete(api, first.job_id)
    assert running.status == pb.JOB_STATUS_QUICK_RUNNING
    assert running.updated_at == lease.job.updated_at
    assert app.metrics.job_transitions_total.labels("queued")._value.get() == 1


async def test_complete_without_object_fails_job(api):
    init = await initiate(api)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, init.job.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "UPLOAD_OBJECT_NOT_FOUND"
    assert "upload the file" in err.value.details()
    job = await get_job(api, init.job.job_id)
    assert job.status == pb.JOB_STATUS_FAILED
    assert job.error.code == "UPLOAD_OBJECT_NOT_FOUND"
    assert await claim(api) == []


async def test_failed_upload_can_be_verified_again(api, moto_s3):
    init = await initiate(api)
    with pytest.raises(grpc.aio.AioRpcError):
        await complete(api, init.job.job_id)
    # The client may fetch a fresh URL with the same request, upload, and complete again.
    await put_object(moto_s3, init.job.bucket, init.job.key)
    job = await complete(api, init.job.job_id)
    assert job.status == pb.JOB_STATUS_QUEUED
    assert not job.HasField("error")
    assert [lease.job.job_id for lease in await claim(api)] == [job.job_id]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "UPLOAD_EMPTY"),
        (VIDEO[:-10], "UPLOAD_SIZE_MISMATCH"),
        (VIDEO + b"!", "UPLOAD_SIZE_MISMATCH"),
    ],
)
async def test_wrong_object_fails_job_with_its_own_code(api, moto_s3, body, reason):
    init = await initiate(api, size=len(VIDEO))
    await put_object(moto_s3, init.job.bucket, init.job.key, body)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, init.job.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == reason
    job = await get_job(api, init.job.job_id)
    assert (job.status, job.error.code) == (pb.JOB_STATUS_FAILED, reason)


async def test_concurrent_complete_makes_exactly_one_transition(api, moto_s3, app):
    init = await initiate(api)
    await put_object(moto_s3, init.job.bucket, init.job.key)
    results = await asyncio.gather(*(complete(api, init.job.job_id) for _ in range(20)))
    assert {r.status for r in results} == {pb.JOB_STATUS_QUEUED}
    assert len({r.updated_at.ToNanoseconds() for r in results}) == 1
    assert app.metrics.job_transitions_total.labels("queued")._value.get() == 1
    assert app.metrics.preflight_total.labels("ok")._value.get() == 1


async def test_job_failed_in_analysis_is_not_requeued_by_complete(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await api.worker.FailJob(
        pb.FailJobRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            error_code="INVALID_MEDIA",
            error_message="not a video",
        ),
        timeout=5,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, lease.job.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "JOB_NOT_RETRYABLE"
    assert "RequeueJob" in err.value.details()


async def error_rows(app, job_id: str) -> list[str]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT code FROM video_analysis_job_errors WHERE job_id = :id ORDER BY id"),
            {"id": job_id},
        )
        return [r[0] for r in rows]


async def test_retrying_complete_on_a_failed_upload_keeps_the_history_bounded(
    database_url, moto_s3
):
    settings = settings_for(database_url, moto_s3, max_upload_error_rows=3)
    async with (
        JobServiceApp(settings) as app,
        auth.channel(f"127.0.0.1:{app.port}") as ch,
    ):
        api = stubs_for(ch)
        init = await initiate(api)
        for _ in range(25):  # a client retrying in a loop
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await complete(api, init.job.job_id)
            assert error_reason(err.value) == "UPLOAD_OBJECT_NOT_FOUND"
        assert await error_rows(app, init.job.job_id) == ["UPLOAD_OBJECT_NOT_FOUND"]
        # A different outcome is recorded, up to the cap.
        for body in (b"", VIDEO[:5], b"", VIDEO[:5], b""):
            await put_object(moto_s3, init.job.bucket, init.job.key, body)
            with pytest.raises(grpc.aio.AioRpcError):
                await complete(api, init.job.job_id)
        assert await error_rows(app, init.job.job_id) == [
            "UPLOAD_OBJECT_NOT_FOUND",
            "UPLOAD_EMPTY",
            "UPLOAD_SIZE_MISMATCH",
        ]
        # The job itself always shows the latest verdict.
        assert (await get_job(api, init.job.job_id)).error.code == "UPLOAD_EMPTY"


async def test_declared_checksum_is_compared_with_what_s3_stored(api, moto_s3):
    """moto stores whatever checksum it is sent (it verifies nothing, see decisions.md), so the
    rejection of wrong bytes is tested on SeaweedFS; here: an object that arrived without the
    signed checksum headers fails with UPLOAD_CHECKSUM_MISMATCH and is recoverable."""
    digest = hashlib.sha256(VIDEO).digest()
    init = await initiate(api, sha256=digest)
    assert init.upload_headers["x-amz-checksum-sha256"] == base64.b64encode(digest).decode()
    await put_object(moto_s3, init.job.bucket, init.job.key)  # no checksum with it
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, init.job.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "UPLOAD_CHECKSUM_MISMATCH"
    assert "carries no SHA-256" in err.value.details()
    job = await queued_via_url(api, init)
    assert job.status == pb.JOB_STATUS_QUEUED
    [lease] = await claim(api)
    assert lease.sha256 == digest


async def queued_via_url(api, init: pb.InitiateUploadResponse, body: bytes = VIDEO) -> pb.Job:
    """PUT through the job's presigned URL with its signed headers, then complete."""
    status = await asyncio.to_thread(http_put, init.upload_url, body, dict(init.upload_headers))
    assert status == 200
    return await complete(api, init.job.job_id)


def http_put(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


async def overwrite_and_report_changed(api, moto_s3, lease: pb.Lease, body: bytes) -> None:
    """Someone overwrites the verified object; the worker's If-Match download notices and
    fails the job UPLOAD_CHANGED (as the analysis worker does)."""
    await put_object(moto_s3, lease.bucket, lease.key, body)
    await api.worker.FailJob(
        pb.FailJobRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            error_code="UPLOAD_CHANGED",
            error_message="the object's ETag is not the verified one",
        ),
        timeout=10,
    )


async def test_upload_overwritten_after_verification_is_recovered_by_complete_upload(api, moto_s3):
    # With a declared checksum: re-verification refuses other bytes, accepts the right ones.
    digest = hashlib.sha256(VIDEO).digest()
    init = await initiate(api, sha256=digest)
    first = await queued_via_url(api, init)
    [lease] = await claim(api)
    tampered = VIDEO[:-1] + b"!"
    await overwrite_and_report_changed(api, moto_s3, lease, tampered)
    failed = await get_job(api, first.job_id)
    assert (failed.status, failed.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_CHANGED")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, first.job_id)
    assert error_reason(err.value) == "UPLOAD_CHECKSUM_MISMATCH"
    job = await queued_via_url(api, init)  # its presigned URL can only write the right bytes
    assert job.status == pb.JOB_STATUS_QUEUED and not job.HasField("error")
    [lease2] = await claim(api)
    assert lease2.job.job_id == first.job_id and lease2.etag == job.etag

    # Without a checksum (a raw-stub client): re-verification records the new ETag, so the
    # worker analyses exactly the bytes that were verified the second time.
    raw = await initiate(api)
    await put_object(moto_s3, raw.job.bucket, raw.job.key)
    plain = await complete(api, raw.job.job_id)
    [lease3] = await claim(api)
    other = bytes(reversed(VIDEO))
    await overwrite_and_report_changed(api, moto_s3, lease3, other)
    job = await complete(api, plain.job_id)
    assert job.status == pb.JOB_STATUS_QUEUED and job.etag != plain.etag
    head = await asyncio.to_thread(moto_s3.client().head_object, Bucket=job.bucket, Key=job.key)
    assert job.etag == head["ETag"].strip('"')
    [lease4] = await claim(api)
    assert lease4.etag == job.etag


async def test_requeue_of_an_upload_changed_job_records_the_new_etag(api, moto_s3):
    plain = await initiate(api)
    await put_object(moto_s3, plain.job.bucket, plain.job.key)
    job = await complete(api, plain.job.job_id)
    [lease] = await claim(api)
    await overwrite_and_report_changed(api, moto_s3, lease, bytes(reversed(VIDEO)))
    resp = await api.admin.RequeueJob(pb.RequeueJobRequest(job_id=job.job_id), timeout=10)
    assert resp.job.status == pb.JOB_STATUS_QUEUED and resp.job.etag != job.etag


async def test_requeue_refuses_an_overwritten_checksummed_upload(api, moto_s3):
    digest = hashlib.sha256(VIDEO).digest()
    init = await initiate(api, sha256=digest)
    job = await queued_via_url(api, init)
    [lease] = await claim(api)
    await overwrite_and_report_changed(api, moto_s3, lease, bytes(reversed(VIDEO)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.admin.RequeueJob(pb.RequeueJobRequest(job_id=job.job_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "SHA-256" in err.value.details()
    assert (await get_job(api, job.job_id)).error.code == "UPLOAD_CHANGED"  # unchanged
