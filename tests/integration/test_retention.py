"""Retention of finished jobs on real Postgres (and moto for results): only DONE/FAILED jobs
older than the age go, with their error rows; active jobs never; deletes run in bounded
batches that skip rows other transactions hold; results in S3 go only when asked."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from job_service.storage.db import asyncpg_dsn
from tests.conftest import settings_for, stubs_for
from tests.support import auth
from tests.support.flows import claim, error_reason, initiate, put_object, queued_job

DAY = 86400
OLD = 10 * DAY


async def backdate(app: JobServiceApp, job_ids: list[str], seconds: float) -> None:
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET updated_at = now() - make_interval(secs => :s) "
                "WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"s": seconds, "ids": job_ids},
        )


async def scalar(app: JobServiceApp, sql: str, **params: object) -> int:
    async with app.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


async def job_ids_left(app: JobServiceApp) -> set[str]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(text("SELECT id::text FROM video_analysis_jobs"))
        return {r[0] for r in rows}


async def done_job(api, moto_s3) -> str:
    job = await queued_job(api, moto_s3)
    [lease] = await claim(api)
    assert lease.job.job_id == job.job_id
    for status, pct in ((pb.JOB_STATUS_QUICK_DONE, 50), (pb.JOB_STATUS_DEEP_RUNNING, 60)):
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(
                job_id=job.job_id, lease_token=lease.lease_token, status=status, progress_pct=pct
            ),
            timeout=10,
        )
    await api.worker.CompleteJob(
        pb.CompleteJobRequest(job_id=job.job_id, lease_token=lease.lease_token), timeout=10
    )
    return job.job_id


async def failed_job(api, moto_s3) -> str:
    job = await queued_job(api, moto_s3)
    [lease] = await claim(api)
    await api.worker.FailJob(
        pb.FailJobRequest(
            job_id=job.job_id,
            lease_token=lease.lease_token,
            error_code="INVALID_MEDIA",
            error_message="not a video",
        ),
        timeout=10,
    )
    return job.job_id


async def upload_failed_job(api) -> str:
    """Failed at verification; CompleteUpload retried, so the job has an upload error row (the
    same failure repeated is recorded once: the history is bounded)."""
    init = await initiate(api)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await api.upload.CompleteUpload(
                pb.CompleteUploadRequest(job_id=init.job.job_id), timeout=10
            )
    return init.job.job_id


async def active_jobs(api, moto_s3) -> dict[str, str]:
    """One job in every status a purge must never touch."""
    out = {"awaiting_upload": (await initiate(api)).job.job_id}
    running = await queued_job(api, moto_s3)
    [lease] = await claim(api)
    assert lease.job.job_id == running.job_id
    out["quick_running"] = running.job_id
    out["queued"] = (await queued_job(api, moto_s3)).job_id
    return out


def dur(seconds: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(seconds))


async def test_purge_takes_only_old_finished_jobs_in_bounded_batches(api, app, moto_s3):
    old_done = [await done_job(api, moto_s3) for _ in range(4)]
    old_failed = [await failed_job(api, moto_s3) for _ in range(2)]
    old_failed.append(await upload_failed_job(api))
    fresh_done = await done_job(api, moto_s3)
    active = await active_jobs(api, moto_s3)  # last: a claim takes the oldest queued job
    await backdate(app, [*old_done, *old_failed, *active.values()], OLD)
    errors_before = await scalar(app, "SELECT count(*) FROM video_analysis_job_errors")
    assert errors_before >= 2 + 1  # two worker failures, one upload verification failure

    report = await app.retention.purge(timedelta(days=7), batch=2)

    assert report.jobs == 7 and not report.dry_run and not report.more
    assert report.batches == (2, 2, 2, 1)  # never more than the batch size per transaction
    assert report.error_rows == errors_before  # every error row belonged to a purged job
    assert await job_ids_left(app) == {fresh_done, *active.values()}
    assert await scalar(app, "SELECT count(*) FROM video_analysis_job_errors") == 0
    # Nothing left to take: a second pass is empty.
    assert (await app.retention.purge(timedelta(days=7), batch=2)).jobs == 0
    # The running job's lease is untouched.
    running = active["quick_running"]
    ref = pb.LeaseRef(job_id=running, lease_token=await _token(app, running))
    beat = await api.worker.Heartbeat(
        pb.HeartbeatRequest(worker_id="w-1", leases=[ref]), timeout=10
    )
    assert beat.leases[0].state == pb.LEASE_STATE_HELD


async def _token(app: JobServiceApp, job_id: str) -> str:
    async with app.engine.connect() as conn:
        value = (
            await conn.execute(
                text("SELECT lease_token::text FROM video_analysis_jobs WHERE id = :id"),
                {"id": job_id},
            )
        ).scalar_one()
    return str(value)


async def test_purge_age_is_the_last_change_not_creation(api, app, moto_s3):
    job_id = await done_job(api, moto_s3)
    async with app.engine.begin() as conn:  # created long ago, finished just now
        await conn.execute(
            text("UPDATE video_analysis_jobs SET created_at = now() - interval '30 days'")
        )
    assert (await app.retention.purge(timedelta(days=7))).jobs == 0
    assert await job_ids_left(app) == {job_id}


async def test_purge_skips_rows_another_transaction_holds_without_waiting(
    api, app, moto_s3, database_url
):
    held, free = await done_job(api, moto_s3), await done_job(api, moto_s3)
    await backdate(app, [held, free], OLD)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM video_analysis_jobs WHERE id = $1 FOR UPDATE", held)
        started = time.monotonic()
        report = await asyncio.wait_for(app.retention.purge(timedelta(days=7)), 10)
        assert time.monotonic() - started < 5  # did not wait for the lock
        assert report.jobs == 1
        assert await job_ids_left(app) == {held}
        await tx.rollback()
    finally:
        await conn.close()
    assert (await app.retention.purge(timedelta(days=7))).jobs == 1
    assert await job_ids_left(app) == set()


async def test_purge_jobs_rpc_dry_run_then_purge_with_results(api, app, moto_s3, settings):
    old = [await done_job(api, moto_s3) for _ in range(3)]
    keep = await done_job(api, moto_s3)
    await backdate(app, old, OLD)
    for job_id in [*old, keep]:
        for name in ("01-aaaa/summary.json", "01-aaaa/thumbs/0.jpg"):
            key = f"{settings.s3_results_prefix}{job_id}/{name}"
            await put_object(moto_s3, settings.s3_bucket, key)

    dry = await api.admin.PurgeJobs(
        pb.PurgeJobsRequest(older_than=dur(7 * DAY), dry_run=True, delete_results=True),
        timeout=30,
    )
    assert (dry.jobs, dry.result_objects, dry.batches, dry.more) == (3, 6, 0, False)
    assert await job_ids_left(app) == {*old, keep}  # a dry run changes nothing

    part = await api.admin.PurgeJobs(
        pb.PurgeJobsRequest(older_than=dur(7 * DAY), delete_results=True, max_jobs=2), timeout=30
    )
    assert (part.jobs, part.result_objects, part.more) == (2, 4, True)
    rest = await api.admin.PurgeJobs(
        pb.PurgeJobsRequest(older_than=dur(7 * DAY), delete_results=True), timeout=30
    )
    assert (rest.jobs, rest.result_objects, rest.more) == (1, 2, False)
    assert rest.older_than.ToTimedelta() == timedelta(days=7)
    assert await job_ids_left(app) == {keep}

    client = moto_s3.client()
    listed = await asyncio.to_thread(
        client.list_objects_v2, Bucket=settings.s3_bucket, Prefix=settings.s3_results_prefix
    )
    keys = {o["Key"] for o in listed.get("Contents", [])}
    assert all(keep in k for k in keys if any(j in k for j in (*old, keep)))
    assert sum(keep in k for k in keys) == 2  # the kept job's results are untouched
    assert not any(j in k for k in keys for j in old)


async def test_purge_without_delete_results_leaves_s3_alone(api, app, moto_s3, settings):
    job_id = await done_job(api, moto_s3)
    await backdate(app, [job_id], OLD)
    key = f"{settings.s3_results_prefix}{job_id}/01-aaaa/summary.json"
    await put_object(moto_s3, settings.s3_bucket, key)
    resp = await api.admin.PurgeJobs(pb.PurgeJobsRequest(older_than=dur(7 * DAY)), timeout=30)
    assert (resp.jobs, resp.result_objects) == (1, 0)
    client = moto_s3.client()
    head = await asyncio.to_thread(client.head_object, Bucket=settings.s3_bucket, Key=key)
    assert head["ContentLength"] > 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "older_than"),  # retention is off and no age given
        ({"older_than": duration_pb2.Duration(seconds=3599)}, "older_than"),
        ({"older_than": duration_pb2.Duration(seconds=-1)}, "older_than"),
        ({"older_than": dur(7 * DAY), "max_jobs": -1}, "max_jobs"),
        ({"older_than": dur(7 * DAY), "max_jobs": 100_001}, "max_jobs"),
    ],
)
async def test_purge_jobs_rejects_bad_requests(api, app, moto_s3, fields, field):
    job_id = await done_job(api, moto_s3)
    await backdate(app, [job_id], OLD)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.admin.PurgeJobs(pb.PurgeJobsRequest(**fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    assert error_reason(err.value) == "INVALID_ARGUMENT"
    assert await job_ids_left(app) == {job_id}


async def test_background_task_applies_the_configured_retention(database_url, moto_s3):
    settings = settings_for(
        database_url,
        moto_s3,
        retention_seconds=7 * DAY,
        retention_interval_seconds=0.2,
        retention_delete_results=True,
    )
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as channel:
            api = stubs_for(channel)
            old = [await done_job(api, moto_s3), await failed_job(api, moto_s3)]
            fresh = await done_job(api, moto_s3)
            active = await initiate(api)
            prefix = settings.s3_results_prefix
            keys = {j: f"{prefix}{j}/01-aaaa/summary.json" for j in (*old, fresh)}
            for key in keys.values():
                await put_object(moto_s3, settings.s3_bucket, key)
            await backdate(app, [*old, active.job.job_id], OLD)
            deadline = time.monotonic() + 15
            while await job_ids_left(app) != {fresh, active.job.job_id}:
                assert time.monotonic() < deadline, await job_ids_left(app)
                await asyncio.sleep(0.1)
            client = moto_s3.client()
            listed = await asyncio.to_thread(
                client.list_objects_v2, Bucket=settings.s3_bucket, Prefix=settings.s3_results_prefix
            )
            left = {o["Key"] for o in listed.get("Contents", [])}
            assert keys[fresh] in left and not {keys[j] for j in old} & left
            # Unset older_than means the configured age when retention is on.
            resp = await api.admin.PurgeJobs(pb.PurgeJobsRequest(dry_run=True), timeout=10)
            assert resp.older_than.ToTimedelta() == timedelta(days=7) and resp.jobs == 0


def test_retention_below_the_minimum_age_is_refused_at_start(database_url, moto_s3):
    from job_service.app import check_edge_settings

    with pytest.raises(ValueError, match="RETENTION_SECONDS"):
        check_edge_settings(settings_for(database_url, moto_s3, retention_seconds=60))
    check_edge_settings(settings_for(database_url, moto_s3, retention_seconds=0))


async def test_revision_0008_builds_a_valid_index_over_history_and_rolls_back(pg, fresh_db):
    from alembic import command

    from job_service.storage import migrate
    from tests.conftest import sa_url

    name = fresh_db()
    url = sa_url(pg, name)
    await migrate.upgrade_async(url, "0007")
    # History to index: finished and active jobs written before the revision.
    pg.execute(
        "INSERT INTO video_sessions (id) VALUES ('00000000-0000-0000-0000-000000000001');"
        "INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,"
        " size_bytes, s3_bucket, s3_key, updated_at) SELECT gen_random_uuid(),"
        " '00000000-0000-0000-0000-000000000001', (ARRAY['done','failed','queued'])[1 + i % 3]"
        "::video_analysis_job_status, 'X', 'a.mp4', 'video/mp4', 1, 'videos', 'k' || i,"
        " now() - make_interval(days => i % 30) FROM generate_series(1, 3000) AS i",
        name,
    )
    await migrate.upgrade_async(url, "head")
    await asyncio.to_thread(migrate.check, url)
    valid = pg.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = 'ix_video_analysis_jobs_finished'",
        name,
    )
    assert valid == "t"
    plan = pg.execute(
        "SET enable_seqscan = off; EXPLAIN SELECT id FROM video_analysis_jobs WHERE status IN "
        "('done', 'failed') AND updated_at < now() - interval '7 days' ORDER BY updated_at "
        "LIMIT 500",
        name,
    )
    assert "ix_video_analysis_jobs_finished" in plan

    await asyncio.to_thread(command.downgrade, migrate.alembic_config(url), "0007")
    gone = pg.execute(
        "SELECT count(*) FROM pg_class WHERE relname = 'ix_video_analysis_jobs_finished'", name
    )
    assert gone == "0"
    await migrate.upgrade_async(url, "head")
    await asyncio.to_thread(migrate.check, url)


async def test_purge_over_a_long_history_stays_bounded(api, app, pg, database_url):
    """33,000 old finished jobs (more ids than one statement may bind): a dry run counts them
    all, a purge call takes exactly max_jobs in batches of JOB_SERVICE_RETENTION_BATCH."""
    from sqlalchemy.engine import make_url

    db = make_url(database_url).database
    assert db is not None
    pg.execute(
        "INSERT INTO video_sessions (id) VALUES ('00000000-0000-0000-0000-000000000002');"
        "INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,"
        " size_bytes, s3_bucket, s3_key, updated_at) SELECT gen_random_uuid(),"
        " '00000000-0000-0000-0000-000000000002', 'done', 'DONE', 'a.mp4', 'video/mp4', 1,"
        " 'videos', 'k' || i, now() - interval '30 days' FROM generate_series(1, 33000) AS i;"
        "INSERT INTO video_analysis_job_errors (job_id, attempt, code, message, retryable)"
        " SELECT id, 1, 'DOWNLOAD_FAILED', 'x', true FROM video_analysis_jobs LIMIT 100;",
        db,
    )
    dry = await api.admin.PurgeJobs(
        pb.PurgeJobsRequest(older_than=dur(7 * DAY), dry_run=True, max_jobs=100_000), timeout=60
    )
    assert (dry.jobs, dry.error_rows, dry.more) == (33_000, 100, False)
    part = await api.admin.PurgeJobs(
        pb.PurgeJobsRequest(older_than=dur(7 * DAY), max_jobs=1200), timeout=60
    )
    assert (part.jobs, part.batches, part.more) == (1200, 3, True)  # 500 + 500 + 200
    assert await scalar(app, "SELECT count(*) FROM video_analysis_jobs") == 33_000 - 1200


async def test_results_are_deleted_in_small_batches(api, app, pg, database_url):
    """With delete_results a batch's rows stay locked while S3 answers: batches shrink."""
    from sqlalchemy.engine import make_url

    from job_service.retention import RESULTS_BATCH

    pg.execute(
        "INSERT INTO video_sessions (id) VALUES ('00000000-0000-0000-0000-000000000003');"
        "INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,"
        " size_bytes, s3_bucket, s3_key, updated_at) SELECT gen_random_uuid(),"
        " '00000000-0000-0000-0000-000000000003', 'done', 'DONE', 'a.mp4', 'video/mp4', 1,"
        " 'videos', 'k' || i, now() - interval '30 days' FROM generate_series(1, 120) AS i",
        make_url(database_url).database or "",
    )
    report = await app.retention.purge(timedelta(days=7), delete_results=True, batch=1000)
    assert RESULTS_BATCH == 50 and report.batches == (50, 50, 20)
    rows_only = await app.retention.purge(timedelta(days=7), batch=1000)
    assert rows_only.jobs == 0
