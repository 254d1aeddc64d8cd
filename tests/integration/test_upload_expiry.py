"""The upload expiry the reconciler uses: a retried InitiateUpload moves it (database time)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.support import auth
from tests.support.flows import get_job, initiate
from tests.support.service import settings_for, stubs_for


async def test_a_retried_initiate_moves_the_upload_expiry_the_reconciler_uses(
    database_url, moto_s3
):
    settings = settings_for(
        database_url, moto_s3, reconcile_after_seconds=60.0, reconcile_interval_seconds=3600.0
    )
    async with JobServiceApp(settings) as app:
        # The background reconciler makes its first pass at start; on a busy machine that pass
        # could land after the backdating below and expire the job before the retry. The test
        # makes its passes itself.
        for task in asyncio.all_tasks():
            if task.get_name() == "upload-reconciler":
                task.cancel()
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            rid = str(uuid.uuid4())
            first = await initiate(api, request_id=rid)
            async with app.engine.begin() as conn:  # its URL expired long ago
                await conn.execute(
                    text(
                        "UPDATE video_analysis_jobs SET created_at = now() - CAST(:a AS interval), "
                        "upload_expires_at = now() - CAST(:a AS interval) WHERE id = :id"
                    ),
                    {"a": timedelta(hours=2), "id": first.job.job_id},
                )
            again = await initiate(api, request_id=rid)  # the client asks for a new URL
            assert again.upload_expires_at.ToDatetime() > first.upload_expires_at.ToDatetime()
            assert (await app.uploads.reconcile_stale())["expired"] == 0
            assert (await get_job(api, first.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD
