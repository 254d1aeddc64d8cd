"""The migration history replays the design note's upgrade path on real data."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from alembic.script import ScriptDirectory
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from job_service.storage import migrate
from tests.conftest import sa_url, settings_for, stubs_for
from tests.support import auth
from tests.support.flows import claim, initiate


async def test_jobs_queued_before_awaiting_upload_existed_stay_claimable(pg, fresh_db, moto_s3):
    name = fresh_db()
    url = sa_url(pg, name)
    await migrate.upgrade_async(url, "0001")
    conn = await asyncpg.connect(pg.dsn(name))
    try:
        labels = await conn.fetch(
            "SELECT enumlabel FROM pg_enum WHERE enumtypid = "
            "'video_analysis_job_status'::regtype ORDER BY enumsortorder"
        )
        assert labels[0][0] == "queued"  # the old enum: no awaiting_upload
        session = uuid.uuid4()
        await conn.execute("INSERT INTO video_sessions (id) VALUES ($1)", session)
        old_jobs = [uuid.uuid4() for _ in range(3)]
        for i, job_id in enumerate(old_jobs):
            await conn.execute(
                "INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, "
                "content_type, size_bytes, s3_bucket, s3_key, created_at) VALUES "
                "($1, $2, 'queued', 'QUEUED', 'old.mp4', 'video/mp4', 10, 'videos', $3, "
                "now() - make_interval(mins => $4))",
                job_id,
                session,
                f"uploads/{job_id}",
                10 - i,
            )
    finally:
        await conn.close()

    await migrate.upgrade_async(url, "head")
    await asyncio.to_thread(migrate.check, url)  # schema == declared tables

    conn = await asyncpg.connect(pg.dsn(name))
    try:
        labels = await conn.fetch(
            "SELECT enumlabel FROM pg_enum WHERE enumtypid = "
            "'video_analysis_job_status'::regtype ORDER BY enumsortorder"
        )
        assert [r[0] for r in labels][:2] == ["awaiting_upload", "queued"]
    finally:
        await conn.close()

    async with JobServiceApp(settings_for(url, moto_s3)) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            new = await initiate(api)  # the new status works on the upgraded database
            assert new.job.status == pb.JOB_STATUS_AWAITING_UPLOAD
            leases = await claim(api, max_jobs=10)
            assert [lease.job.job_id for lease in leases] == [str(j) for j in old_jobs]
            assert all(lease.job.status == pb.JOB_STATUS_QUICK_RUNNING for lease in leases)


async def test_upgrade_is_repeatable_and_adding_the_value_twice_is_harmless(pg, fresh_db):
    url = sa_url(pg, fresh_db())
    await migrate.upgrade_async(url, "head")
    await migrate.upgrade_async(url, "head")  # no-op
    conn = await asyncpg.connect(pg.dsn(url.rsplit("/", 1)[1]))
    try:
        await conn.execute(
            "ALTER TYPE video_analysis_job_status ADD VALUE IF NOT EXISTS 'awaiting_upload' "
            "BEFORE 'queued'"
        )
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
        head = ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
        assert version == head
    finally:
        await conn.close()
