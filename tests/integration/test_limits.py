"""Bounded resources: caps on concurrent calls and WatchJob streams answer RESOURCE_EXHAUSTED at
once (no silent queue) while lease-keeping calls are never refused; a WatchJob stream ends
cleanly at its maximum lifetime; WatchJob reads its own small pool, so exhausting it leaves the
lease path untouched."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from job_service.rpc.servicers import WATCH_END_KEY, WATCH_END_MAX_LIFETIME
from tests.support import auth
from tests.support.flows import claim, error_reason, get_job, new_id, queued_job
from tests.support.service import Stubs, settings_for, stubs_for


@contextlib.asynccontextmanager
async def service(
    database_url: str, moto_s3: Any, **overrides: Any
) -> AsyncIterator[tuple[JobServiceApp, Stubs]]:
    async with JobServiceApp(settings_for(database_url, moto_s3, **overrides)) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as channel:
            yield app, stubs_for(channel)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def retry_delay(err: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def heartbeat(api: Stubs, lease: pb.Lease) -> Any:
    ref = pb.LeaseRef(job_id=lease.job.job_id, lease_token=lease.lease_token)
    return api.worker.Heartbeat(pb.HeartbeatRequest(worker_id="w-1", leases=[ref]), timeout=5)


async def test_calls_over_the_cap_are_refused_at_once_but_heartbeats_never(database_url, moto_s3):
    async with service(database_url, moto_s3, max_concurrent_rpcs=3) as (app, api):
        await queued_job(api, moto_s3)
        [lease] = await claim(api)
        parked = [
            asyncio.create_task(claim(api, worker_id=f"p-{i}", wait=5, timeout=10))
            for i in range(3)
        ]
        await until(lambda: app.gate.rpcs == 3)

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_job(api, lease.job.job_id)
        # Refused, not queued: a queued call would wait for the parked ones (5 s).
        assert time.monotonic() - started < 2
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "TOO_MANY_RPCS"
        assert "JOB_SERVICE_MAX_CONCURRENT_RPCS" in err.value.details()
        assert retry_delay(err.value) == 1.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await claim(api, worker_id="p-4")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # The lease path keeps working at the cap.
        beat = await heartbeat(api, lease)
        assert beat.leases[0].state == pb.LEASE_STATE_HELD
        report = pb.ReportProgressRequest(
            job_id=lease.job.job_id, lease_token=lease.lease_token, progress_pct=10
        )
        assert (await api.worker.ReportProgress(report, timeout=5)).job.progress_pct == 10

        for task in parked:
            task.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
        await until(lambda: app.gate.rpcs == 0)
        assert (await get_job(api, lease.job.job_id)).progress_pct == 10


async def read_stream(api: Stubs, job_id: str, out: asyncio.Queue[Any], timeout: float = 30):
    call = api.upload.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)
    async for resp in call:
        await out.put(resp.job)
    await out.put(call)


async def test_watch_streams_over_the_cap_are_refused(database_url, moto_s3):
    async with service(database_url, moto_s3, max_watch_streams=2) as (app, api):
        job = await queued_job(api, moto_s3)
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue(), asyncio.Queue()]
        tasks = [asyncio.create_task(read_stream(api, job.job_id, q)) for q in queues]
        for q in queues:
            assert (await asyncio.wait_for(q.get(), 5)).job_id == job.job_id
        assert app.gate.streams == 2

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in api.upload.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(err.value) == "TOO_MANY_STREAMS"
        assert retry_delay(err.value) == 1.0
        # Unary calls are not counted against the stream cap.
        assert (await get_job(api, job.job_id)).job_id == job.job_id

        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await until(lambda: app.gate.streams == 1)
        third: asyncio.Queue[Any] = asyncio.Queue()
        tasks.append(asyncio.create_task(read_stream(api, job.job_id, third)))
        assert (await asyncio.wait_for(third.get(), 5)).job_id == job.job_id
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await until(lambda: app.gate.streams == 0)


async def test_watch_ends_cleanly_at_its_maximum_lifetime(database_url, moto_s3):
    async with service(database_url, moto_s3, watch_max_seconds=1.0) as (app, api):
        job = await queued_job(api, moto_s3)
        call = api.upload.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30)
        started = time.monotonic()
        got = [resp.job async for resp in call]
        elapsed = time.monotonic() - started
        assert [j.status for j in got] == [pb.JOB_STATUS_QUEUED]
        assert 0.9 <= elapsed < 10
        assert await call.code() == grpc.StatusCode.OK
        trailing = dict(await call.trailing_metadata())
        assert trailing.get(WATCH_END_KEY) == WATCH_END_MAX_LIFETIME
        await until(lambda: app.gate.streams == 0)
        # The client reconnects and is told the current state first.
        [lease] = await claim(api)
        again = api.upload.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30)
        first = await again.read()
        assert first.job.status == pb.JOB_STATUS_QUICK_RUNNING and lease
        again.cancel()

        # A stream whose job finishes ends at once, without the lifetime marker.
        await api.admin.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
        await api.worker.FailJob(
            pb.FailJobRequest(
                job_id=job.job_id, lease_token=lease.lease_token, error_code="CANCELLED"
            ),
            timeout=5,
        )
        done = api.upload.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=30)
        assert [r.job.status async for r in done] == [pb.JOB_STATUS_FAILED]
        assert WATCH_END_KEY not in dict(await done.trailing_metadata())


async def test_exhausted_watch_pool_leaves_the_lease_path_alone(database_url, moto_s3):
    async with service(
        database_url, moto_s3, aux_db_pool_size=1, db_connect_timeout_seconds=5.0
    ) as (app, api):
        job = await queued_job(api, moto_s3)
        [lease] = await claim(api)
        # Take every connection of the WatchJob/admin pool (1 + 1 overflow).
        async with contextlib.AsyncExitStack() as held:
            for _ in range(2):
                await held.enter_async_context(app.aux_engine.connect())

            async def watch() -> grpc.aio.AioRpcError:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in api.upload.WatchJob(
                        pb.WatchJobRequest(job_id=job.job_id), timeout=20
                    ):
                        pass
                return err.value

            waiting = asyncio.create_task(watch())
            await until(lambda: app.gate.streams == 1)
            # While that stream waits for a connection of its pool, the lease path and the
            # upload RPCs answer from their own.
            for _ in range(5):
                beat = await heartbeat(api, lease)
                assert beat.leases[0].state == pb.LEASE_STATE_HELD
            assert (await get_job(api, job.job_id)).status == pb.JOB_STATUS_QUICK_RUNNING
            assert not waiting.done()
            err = await waiting
            assert err.code() == grpc.StatusCode.UNAVAILABLE  # a clear, retryable answer
            with pytest.raises(grpc.aio.AioRpcError) as admin_err:
                await api.admin.GetStats(pb.GetStatsRequest(), timeout=20)
            assert admin_err.value.code() == grpc.StatusCode.UNAVAILABLE
        resp = await api.admin.GetStats(pb.GetStatsRequest(), timeout=10)
        assert resp.counts


async def test_a_burst_of_calls_is_answered_by_the_service_never_cancelled_by_grpc(
    database_url, moto_s3
):
    """5,000 workers reporting at once: thousands of calls of one method arrive faster than
    grpc.aio takes them (one per method per event-loop turn). grpc-core's defaults drop calls
    waiting past 1,000 with CANCELLED, as if the caller had cancelled (a third of this burst did
    before PENDING_CALLS_LIMIT). Every call must reach the service and get its answer."""
    burst = 4000
    async with service(database_url, moto_s3) as (app, _api):
        # Heartbeats for leases this service never granted: each one runs the lease statement
        # and gets the service's own answer, whatever the order.
        refs = [pb.LeaseRef(job_id=new_id(), lease_token=new_id()) for _ in range(burst)]
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(auth.channel(f"127.0.0.1:{app.port}"))
                for _ in range(4)
            ]
            stubs = [stubs_for(ch).worker for ch in channels]

            async def beat(i: int) -> str:
                request = pb.HeartbeatRequest(worker_id=f"w-{i}", leases=[refs[i]])
                try:
                    await stubs[i % len(stubs)].Heartbeat(request, timeout=60)
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.CANCELLED:
                        return "CANCELLED"  # grpc-core's drop: no status of ours to read
                    return f"{err.code().name}:{error_reason(err)}"
                return "OK"

            single = await beat(0)
            answers = collections.Counter(await asyncio.gather(*(beat(i) for i in range(burst))))
        assert single != "OK" and not single.startswith("CANCELLED")
        assert answers == {single: burst}, answers
