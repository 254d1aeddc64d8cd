"""The upload reconciler: clients that never call CompleteUpload still get their job queued
once the object is verified, and an upload that never arrives ends as UPLOAD_EXPIRED."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from datetime import timedelta

from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from jobs_client import JobsClient, _transfer
from tests.support import auth
from tests.support.flows import VIDEO, claim, complete, get_job, initiate, put_object
from tests.support.service import settings_for, stubs_for


async def own_passes(app: JobServiceApp) -> None:
    """The tests drive the reconciler's passes themselves: stop the background one, whose first
    pass runs at start-up and, on a loaded machine, can start late enough to take the jobs a
    test has just set up (a CI run saw it queue the job the test's own pass was to count)."""
    for task in app._tasks:
        if task.get_name() == "upload-reconciler":
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def backdate(
    app: JobServiceApp, job_id: str, *, created: timedelta, expires: timedelta
) -> None:
    """Move a job's creation and URL expiry into the past (negative: into the future)."""
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET created_at = now() - CAST(:c AS interval), "
                "upload_expires_at = now() - CAST(:e AS interval) WHERE id = :id"
            ),
            {"c": created, "e": expires, "id": job_id},
        )


async def test_reconciler_queues_verified_uploads_and_expires_abandoned_ones(database_url, moto_s3):
    # Long interval: the test drives the passes itself.
    settings = settings_for(
        database_url, moto_s3, reconcile_after_seconds=60.0, reconcile_interval_seconds=3600.0
    )
    async with JobServiceApp(settings) as app:
        await own_passes(app)
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            uploaded = await initiate(api)
            await put_object(moto_s3, uploaded.job.bucket, uploaded.job.key)
            await backdate(
                app,
                uploaded.job.job_id,
                created=timedelta(minutes=5),
                expires=timedelta(minutes=-55),
            )
            rid = str(uuid.uuid4())
            abandoned = await initiate(api, request_id=rid)
            await backdate(
                app, abandoned.job.job_id, created=timedelta(hours=2), expires=timedelta(hours=1)
            )
            in_progress = await initiate(api)
            await backdate(
                app,
                in_progress.job.job_id,
                created=timedelta(minutes=5),
                expires=timedelta(minutes=-55),
            )
            fresh = await initiate(api)

            counts = await app.uploads.reconcile_stale()
            assert counts == {"queued": 1, "failed": 0, "expired": 1, "waiting": 1, "error": 0}
            assert (await get_job(api, uploaded.job.job_id)).status == pb.JOB_STATUS_QUEUED
            expired = await get_job(api, abandoned.job.job_id)
            assert (expired.status, expired.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_EXPIRED")
            for job in (in_progress, fresh):
                assert (await get_job(api, job.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD
            # Checked jobs are not looked at again in the next pass.
            assert await app.uploads.reconcile_stale() == {
                "queued": 0,
                "failed": 0,
                "expired": 0,
                "waiting": 0,
                "error": 0,
            }
            assert [lease.job.job_id for lease in await claim(api)] == [uploaded.job.job_id]

            # The abandoned upload's client comes back: a new URL, upload, complete.
            again = await initiate(api, request_id=rid)
            assert again.job.job_id == abandoned.job.job_id and again.upload_url
            await put_object(moto_s3, again.job.bucket, again.job.key, VIDEO)
            assert (await complete(api, again.job.job_id)).status == pb.JOB_STATUS_QUEUED


async def test_expired_upload_whose_object_fails_verification_ends_failed_with_its_code(
    database_url, moto_s3
):
    settings = settings_for(
        database_url, moto_s3, reconcile_after_seconds=60.0, reconcile_interval_seconds=3600.0
    )
    async with JobServiceApp(settings) as app:
        await own_passes(app)
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            wrong = await initiate(api)
            await put_object(moto_s3, wrong.job.bucket, wrong.job.key, VIDEO[:10])
            # Before the URL expires the client may still replace it: left waiting.
            await backdate(
                app, wrong.job.job_id, created=timedelta(minutes=5), expires=timedelta(minutes=-5)
            )
            counts = await app.uploads.reconcile_stale()
            assert counts["waiting"] == 1
            assert (await get_job(api, wrong.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD
            # After it expired, it ends FAILED with the verification's own code (not forever
            # waiting, and not UPLOAD_EXPIRED: the object is there, it is the wrong one).
            await backdate(
                app, wrong.job.job_id, created=timedelta(hours=3), expires=timedelta(hours=2)
            )
            async with app.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE video_analysis_jobs SET upload_checked_at = NULL WHERE id = :id"),
                    {"id": wrong.job.job_id},
                )
            counts = await app.uploads.reconcile_stale()
            assert counts["failed"] == 1
            job = await get_job(api, wrong.job.job_id)
            assert (job.status, job.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_SIZE_MISMATCH")


async def test_a_row_without_upload_expiry_also_expires(database_url, moto_s3):
    settings = settings_for(
        database_url,
        moto_s3,
        reconcile_after_seconds=60.0,
        reconcile_interval_seconds=3600.0,
        upload_url_ttl_seconds=3600,
    )
    async with JobServiceApp(settings) as app:
        await own_passes(app)
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            old, recent = await initiate(api), await initiate(api)
            async with app.engine.begin() as conn:
                for job_id, age in (
                    (old.job.job_id, timedelta(hours=3)),
                    (recent.job.job_id, timedelta(minutes=10)),
                ):
                    await conn.execute(
                        text(
                            "UPDATE video_analysis_jobs SET upload_expires_at = NULL, "
                            "created_at = now() - CAST(:age AS interval) WHERE id = :id"
                        ),
                        {"age": age, "id": job_id},
                    )
            counts = await app.uploads.reconcile_stale()
            assert (counts["expired"], counts["waiting"]) == (1, 1)
            expired = await get_job(api, old.job.job_id)
            assert (expired.status, expired.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_EXPIRED")
            assert (await get_job(api, recent.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD


async def test_reconciler_completes_a_multipart_upload_whose_client_forgot(
    database_url, moto_s3, tmp_path
):
    settings = settings_for(
        database_url, moto_s3, reconcile_after_seconds=60.0, reconcile_interval_seconds=3600.0
    )
    async with JobServiceApp(settings) as app:
        await own_passes(app)
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            client = JobsClient(ch)
            body = os.urandom(17 * 1024**2)
            init = await client.initiate(
                filename="m.mp4", content_type="video/mp4", size_bytes=len(body), multipart=True
            )
            chunks = [body[: 16 * 1024**2], body[16 * 1024**2 :]]
            signed = await client.sign_parts(
                init.job.job_id, [(n, hashlib.sha256(c).digest()) for n, c in enumerate(chunks, 1)]
            )
            for part, chunk in zip(signed, chunks, strict=True):
                path = tmp_path / f"p{part.part_number}"
                path.write_bytes(chunk)
                await asyncio.to_thread(
                    _transfer.put_range, part.url, dict(part.headers), path, 0, len(chunk),
                    lambda n: None, 10,
                )  # fmt: skip
            # ... and never calls CompleteUpload.
            await backdate(
                app, init.job.job_id, created=timedelta(minutes=5), expires=timedelta(minutes=-55)
            )
            assert (await app.uploads.reconcile_stale())["queued"] == 1
            job = await get_job(api, init.job.job_id)
            assert job.status == pb.JOB_STATUS_QUEUED and job.etag.endswith("-2")
