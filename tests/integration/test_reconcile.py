"""The upload reconciler: clients that never call CompleteUpload still get their job queued
once the object is verified, and an upload that never arrives ends as UPLOAD_EXPIRED."""

from __future__ import annotations

import uuid
from datetime import timedelta

from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.conftest import settings_for, stubs_for
from tests.support import auth
from tests.support.flows import VIDEO, claim, complete, get_job, initiate, put_object


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
            assert counts == {"queued": 1, "expired": 1, "waiting": 1, "error": 0}
            assert (await get_job(api, uploaded.job.job_id)).status == pb.JOB_STATUS_QUEUED
            expired = await get_job(api, abandoned.job.job_id)
            assert (expired.status, expired.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_EXPIRED")
            for job in (in_progress, fresh):
                assert (await get_job(api, job.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD
            # Checked jobs are not looked at again in the next pass.
            assert await app.uploads.reconcile_stale() == {
                "queued": 0,
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
