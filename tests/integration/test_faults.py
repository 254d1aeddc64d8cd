"""Transient faults (S3 or the database unreachable) answer UNAVAILABLE and never change or fail
a job. The faults are real: the service talks to moto and Postgres through a TCP proxy that
refuses, hangs or answers 503."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.conftest import settings_for, stubs_for
from tests.support import auth
from tests.support.faults import FaultyProxy
from tests.support.flows import complete, error_reason, get_job, initiate, put_object


@pytest.fixture
async def s3_proxy(moto_s3) -> AsyncIterator[FaultyProxy]:
    proxy = await FaultyProxy("127.0.0.1", moto_s3.port).start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def api_via_s3_proxy(database_url, moto_s3, s3_proxy):
    settings = settings_for(
        database_url, moto_s3, s3_endpoint_url=f"http://{s3_proxy.address}", s3_timeout_seconds=1
    )
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as channel:
            yield stubs_for(channel), app


async def job_row(app: JobServiceApp, job_id: str) -> dict:
    async with app.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT * FROM video_analysis_jobs WHERE id = :id"), {"id": job_id}
            )
        ).one()
    return dict(row._mapping)


@pytest.mark.parametrize("mode", ["refuse", "http503", "hang"])
async def test_transient_s3_fault_leaves_job_untouched(api_via_s3_proxy, s3_proxy, moto_s3, mode):
    api, app = api_via_s3_proxy
    init = await initiate(api)
    await put_object(moto_s3, init.job.bucket, init.job.key)
    before = await job_row(app, init.job.job_id)

    s3_proxy.set_mode(mode)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, init.job.job_id)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(err.value) == "S3_UNAVAILABLE"
    assert "retry" in err.value.details()
    assert await job_row(app, init.job.job_id) == before  # not a byte changed
    assert app.metrics.preflight_total.labels("transient")._value.get() == 1

    # The fault passes; the same call now succeeds.
    s3_proxy.set_mode("pass")
    job = await complete(api, init.job.job_id)
    assert job.status == pb.JOB_STATUS_QUEUED


@pytest.fixture
async def pg_proxy(pg) -> AsyncIterator[FaultyProxy]:
    proxy = await FaultyProxy("127.0.0.1", pg.port).start()
    yield proxy
    await proxy.stop()


async def test_database_unreachable_answers_unavailable(database_url, moto_s3, pg_proxy):
    parts = urlsplit(database_url)
    proxied = database_url.replace(parts.netloc, f"{parts.username}@{pg_proxy.address}")
    settings = settings_for(proxied, moto_s3, db_connect_timeout_seconds=1)
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as channel:
            api = stubs_for(channel)
            init = await initiate(api)
            await put_object(moto_s3, init.job.bucket, init.job.key)

            pg_proxy.set_mode("refuse")
            for call in (
                lambda: get_job(api, init.job.job_id),
                lambda: complete(api, init.job.job_id),
                lambda: initiate(api),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_reason(err.value) == "DATABASE_UNAVAILABLE"

            pg_proxy.set_mode("pass")
            job = await complete(api, init.job.job_id)
            assert job.status == pb.JOB_STATUS_QUEUED
