"""Transient database errors outside the lease path (uploads, admin, WatchJob) are UNAVAILABLE
or ABORTED with a SQLSTATE in the ErrorInfo, never INTERNAL. Faults are real Postgres states:
a read-only database (as during failover), lock and statement timeouts against a row another
session holds, and real serialization failures and deadlocks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from job_service.rpc.errors import status_for
from job_service.storage.db import asyncpg_dsn, classify, domain_error
from tests.support.flows import initiate, put_object, queued_job


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err.details()
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo")


async def unavailable(call, sqlstate: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    info = error_info(err.value)
    assert info.reason == "DATABASE_UNAVAILABLE"
    assert info.metadata["sqlstate"] == sqlstate
    assert "retry" in err.value.details()


@contextlib.asynccontextmanager
async def database_setting(
    pg, app, database_url: str, name: str, value: str
) -> AsyncIterator[None]:
    """ALTER DATABASE ... SET for new sessions, and drop the service's pooled connections so
    its next calls see it; RESET afterwards."""
    db = make_url(database_url).database
    pg.execute(f"ALTER DATABASE \"{db}\" SET {name} = '{value}'")
    await app.engine.dispose()
    await app.aux_engine.dispose()
    try:
        yield
    finally:
        pg.execute(f'ALTER DATABASE "{db}" RESET {name}')
        await app.engine.dispose()
        await app.aux_engine.dispose()


@contextlib.asynccontextmanager
async def row_locked(database_url: str, job_id: str) -> AsyncIterator[None]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM video_analysis_jobs WHERE id = $1 FOR UPDATE", job_id)
        yield
        await tx.rollback()
    finally:
        await conn.close()


async def test_read_only_database_answers_unavailable_and_reads_still_work(
    pg, app, api, database_url, moto_s3
):
    waiting = (await initiate(api)).job.job_id
    async with database_setting(pg, app, database_url, "default_transaction_read_only", "on"):
        await unavailable(
            api.upload.InitiateUpload(
                pb.InitiateUploadRequest(filename="a.mp4", content_type="video/mp4", size_bytes=9),
                timeout=10,
            ),
            "25006",
        )
        await unavailable(
            api.admin.CancelJob(pb.CancelJobRequest(job_id=waiting), timeout=10), "25006"
        )
        init = await api.upload.GetJob(pb.GetJobRequest(job_id=waiting), timeout=10)
        await put_object(moto_s3, init.job.bucket, init.job.key)
        await unavailable(
            api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=waiting), timeout=10),
            "25006",
        )
        # Reads keep working on a read-only database.
        listed = await api.admin.ListJobs(pb.ListJobsRequest(), timeout=10)
        assert [j.job_id for j in listed.jobs] == [waiting]
        stream = api.upload.WatchJob(pb.WatchJobRequest(job_id=waiting), timeout=10)
        first = await anext(aiter(stream))
        stream.cancel()  # done with it: a stream left open would outlive the test
        assert first.job.status == pb.JOB_STATUS_AWAITING_UPLOAD
    # Writable again: the retry succeeds, and the refused calls changed nothing.
    job = await api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=waiting), timeout=10)
    assert job.job.status == pb.JOB_STATUS_QUEUED
    listed = await api.admin.ListJobs(pb.ListJobsRequest(), timeout=10)
    assert len(listed.jobs) == 1


@pytest.mark.parametrize(
    ("setting", "sqlstate"), [("lock_timeout", "55P03"), ("statement_timeout", "57014")]
)
async def test_lock_and_statement_timeouts_answer_unavailable(
    pg, app, api, database_url, moto_s3, setting, sqlstate
):
    job = await queued_job(api, moto_s3)
    waiting = (await initiate(api)).job
    await put_object(moto_s3, waiting.bucket, waiting.key)
    async with database_setting(pg, app, database_url, setting, "300ms"):
        async with row_locked(database_url, job.job_id), row_locked(database_url, waiting.job_id):
            await unavailable(
                api.admin.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10), sqlstate
            )
            await unavailable(
                api.upload.CompleteUpload(
                    pb.CompleteUploadRequest(job_id=waiting.job_id), timeout=10
                ),
                sqlstate,
            )
        cancelled = await api.admin.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10)
        assert cancelled.job.status == pb.JOB_STATUS_FAILED
        done = await api.upload.CompleteUpload(
            pb.CompleteUploadRequest(job_id=waiting.job_id), timeout=10
        )
        assert done.job.status == pb.JOB_STATUS_QUEUED


async def test_real_serialization_failures_and_deadlocks_map_to_aborted(api, database_url):
    a, b = (await initiate(api)).job.job_id, (await initiate(api)).job.job_id
    engine = create_async_engine(database_url)
    update = text("UPDATE video_analysis_jobs SET progress_pct = progress_pct + 1 WHERE id = :id")
    try:
        # Serialization failure: a REPEATABLE READ transaction updates a row changed after its
        # snapshot.
        async with engine.connect() as c1, engine.connect() as c2:
            await c1.execution_options(isolation_level="REPEATABLE READ")
            await c1.begin()
            await c1.execute(text("SELECT 1 FROM video_analysis_jobs"))
            async with c2.begin():
                await c2.execute(update, {"id": a})
            with pytest.raises(Exception) as serialization:
                await c1.execute(update, {"id": a})
            await c1.rollback()
        # Deadlock: two transactions lock the same two rows in opposite orders.
        async with engine.connect() as c1, engine.connect() as c2:
            await c1.begin()
            await c2.begin()
            await c1.execute(update, {"id": a})
            await c2.execute(update, {"id": b})
            results = await asyncio.gather(
                c1.execute(update, {"id": b}),
                c2.execute(update, {"id": a}),
                return_exceptions=True,
            )
            deadlock = next(r for r in results if isinstance(r, BaseException))
            await c1.rollback()
            await c2.rollback()
    finally:
        await engine.dispose()

    # Storage's boundary (transaction(), LeasePool.run) classifies; rpc maps the domain error.
    for exc, state in ((serialization.value, "40001"), (deadlock, "40P01")):
        fault = classify(exc)
        assert fault is not None, exc
        code, message, reason, meta = status_for(domain_error(exc, fault))
        assert code == grpc.StatusCode.ABORTED, (exc, message)
        assert reason == "DATABASE_CONFLICT" and meta == {"sqlstate": state}
        assert "retry" in message
