"""AdminService (ListJobs, GetStats, RequeueJob, CancelJob) and UploadService.WatchJob through
the real in-process server. Ages are made deterministic by backdating rows with SQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from tests.support.flows import (
    claim,
    complete,
    error_reason,
    get_job,
    initiate,
    new_id,
    put_object,
    queued_job,
)

#: Below the server's WATCH_REFRESH_SECONDS (5 s): an event this fast came from NOTIFY.
EVENT_TIMEOUT = 3.0


def dur(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


async def backdate(app, job_id: str, column: str, seconds: float) -> None:
    assert column in {"created_at", "updated_at", "available_at"}
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                f"UPDATE video_analysis_jobs SET {column} = now() - make_interval(secs => :s) "
                "WHERE id = :id"
            ),
            {"s": seconds, "id": job_id},
        )


async def list_jobs(api, **fields) -> pb.ListJobsResponse:
    return await api.admin.ListJobs(pb.ListJobsRequest(**fields), timeout=10)


async def stats(api, **fields) -> pb.GetStatsResponse:
    return await api.admin.GetStats(pb.GetStatsRequest(**fields), timeout=10)


async def requeue(api, job_id: str, reason: str = "test") -> pb.Job:
    resp = await api.admin.RequeueJob(
        pb.RequeueJobRequest(job_id=job_id, reason=reason), timeout=10
    )
    return resp.job


async def cancel(api, job_id: str, reason: str = "test") -> pb.Job:
    resp = await api.admin.CancelJob(pb.CancelJobRequest(job_id=job_id, reason=reason), timeout=10)
    return resp.job


async def report(api, lease: pb.Lease, status=pb.JOB_STATUS_UNSPECIFIED, pct: int = 0) -> pb.Job:
    req = pb.ReportProgressRequest(
        job_id=lease.job.job_id, lease_token=lease.lease_token, status=status, progress_pct=pct
    )
    return (await api.worker.ReportProgress(req, timeout=10)).job


async def finish(api, lease: pb.Lease) -> pb.Job:
    await report(api, lease, pb.JOB_STATUS_QUICK_DONE, 50)
    await report(api, lease, pb.JOB_STATUS_DEEP_RUNNING, 60)
    req = pb.CompleteJobRequest(job_id=lease.job.job_id, lease_token=lease.lease_token)
    return (await api.worker.CompleteJob(req, timeout=10)).job


async def fail(api, lease: pb.Lease, code: str = "INVALID_MEDIA") -> pb.Job:
    req = pb.FailJobRequest(
        job_id=lease.job.job_id,
        lease_token=lease.lease_token,
        error_code=code,
        error_message="not a video",
        retryable=False,
    )
    return (await api.worker.FailJob(req, timeout=10)).job


async def failed_job(api, moto_s3) -> pb.Job:
    """A job that failed during analysis (not at upload verification)."""
    job = await queued_job(api, moto_s3)
    [lease] = await claim(api)
    assert lease.job.job_id == job.job_id
    return await fail(api, lease)


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# ------------------------------------------------------------------------------------ ListJobs


async def test_list_jobs_pages_through_everything_once_newest_first(api):
    made = [(await initiate(api)).job.job_id for _ in range(7)]
    pages: list[list[str]] = []
    token = ""
    while True:
        resp = await list_jobs(api, page_size=3, page_token=token)
        pages.append([j.job_id for j in resp.jobs])
        token = resp.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1]
    seen = [job_id for page in pages for job_id in page]
    assert len(seen) == len(set(seen))  # no duplicates
    assert set(seen) == set(made)  # no gaps
    assert seen == list(reversed(made))  # newest change first

    # An exact multiple of the page size ends with an empty token, not an empty page.
    resp = await list_jobs(api, page_size=7)
    assert len(resp.jobs) == 7 and resp.next_page_token == ""
    assert len((await list_jobs(api)).jobs) == 7  # 0 means the default page size (50)


async def test_list_jobs_filters_by_status(api, moto_s3):
    waiting = {(await initiate(api)).job.job_id for _ in range(2)}
    queued = {(await queued_job(api, moto_s3)).job_id for _ in range(2)}
    missing = (await initiate(api)).job.job_id
    with pytest.raises(grpc.aio.AioRpcError):
        await complete(api, missing)  # no object: the job is failed

    async def ids(*statuses) -> set[str]:
        return {j.job_id for j in (await list_jobs(api, statuses=list(statuses))).jobs}

    assert await ids(pb.JOB_STATUS_AWAITING_UPLOAD) == waiting
    assert await ids(pb.JOB_STATUS_QUEUED) == queued
    assert await ids(pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_FAILED) == queued | {missing}
    assert await ids(pb.JOB_STATUS_DONE) == set()
    assert await ids() == waiting | queued | {missing}


async def test_list_jobs_filters_by_age_of_last_change(api, app, moto_s3):
    stuck = [(await initiate(api)).job.job_id for _ in range(2)]
    fresh = (await initiate(api)).job.job_id
    old_queued = (await queued_job(api, moto_s3)).job_id
    for job_id in (*stuck, old_queued):
        await backdate(app, job_id, "updated_at", 600)

    resp = await list_jobs(api, older_than=dur(300))
    assert {j.job_id for j in resp.jobs} == {*stuck, old_queued}
    # The design note's "stuck in awaiting_upload for more than 5 minutes".
    resp = await list_jobs(api, statuses=[pb.JOB_STATUS_AWAITING_UPLOAD], older_than=dur(300))
    assert {j.job_id for j in resp.jobs} == set(stuck)
    # Created seconds ago: younger than any threshold a slow machine could cross meanwhile.
    assert fresh not in {j.job_id for j in (await list_jobs(api, older_than=dur(120))).jobs}


async def test_list_jobs_paginates_with_filters(api, app):
    made = [(await initiate(api)).job.job_id for _ in range(5)]
    for job_id in made[:4]:
        await backdate(app, job_id, "updated_at", 600)
    first = await list_jobs(api, older_than=dur(60), page_size=3)
    second = await list_jobs(api, older_than=dur(60), page_size=3, page_token=first.next_page_token)
    got = [j.job_id for j in (*first.jobs, *second.jobs)]
    assert sorted(got) == sorted(made[:4]) and second.next_page_token == ""


@pytest.mark.parametrize(
    "fields",
    [
        {"page_token": "not-a-token"},
        {"page_token": "!!!"},
        {"page_size": 501},
        {"page_size": -1},
        {"statuses": [pb.JOB_STATUS_UNSPECIFIED]},
        {"statuses": [99]},
        {"older_than": duration_pb2.Duration(seconds=-5)},
    ],
    ids=lambda f: next(iter(f)),
)
async def test_list_jobs_rejects_bad_requests(api, fields):
    await initiate(api)
    err = await rpc_error(list_jobs(api, **fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err) == "INVALID_ARGUMENT"


# ------------------------------------------------------------------------------------ GetStats


async def test_stats_counts_oldest_queued_and_stuck_uploads(api, app, moto_s3, settings):
    empty = await stats(api)
    assert {c.status: c.count for c in empty.counts} == {
        s: 0 for s in pb.JobStatus.values() if s != pb.JOB_STATUS_UNSPECIFIED
    }
    assert empty.oldest_queued_age.ToTimedelta() == timedelta(0)
    assert empty.stuck_after.ToTimedelta() == timedelta(seconds=settings.stuck_upload_seconds)

    await failed_job(api, moto_s3)
    stuck = (await initiate(api)).job.job_id
    await initiate(api)  # fresh: not stuck
    queued = [(await queued_job(api, moto_s3)).job_id for _ in range(3)]
    await backdate(app, stuck, "created_at", 600)
    await backdate(app, queued[0], "available_at", 900)

    resp = await stats(api)
    counts = {c.status: c.count for c in resp.counts}
    assert counts[pb.JOB_STATUS_AWAITING_UPLOAD] == 2
    assert counts[pb.JOB_STATUS_QUEUED] == 3
    assert counts[pb.JOB_STATUS_FAILED] == 1
    assert counts[pb.JOB_STATUS_DONE] == 0
    assert 900 <= resp.oldest_queued_age.ToTimedelta().total_seconds() < 960
    assert resp.stuck_awaiting_upload == 1  # the default threshold is 300 s

    assert (await stats(api, stuck_after=dur(1200))).stuck_awaiting_upload == 0
    short = await stats(api, stuck_after=dur(0.1))
    assert short.stuck_after.ToTimedelta() == timedelta(seconds=0.1)
    await asyncio.sleep(0.2)
    assert (await stats(api, stuck_after=dur(0.1))).stuck_awaiting_upload == 2


async def test_stats_rejects_a_negative_threshold(api):
    err = await rpc_error(stats(api, stuck_after=duration_pb2.Duration(seconds=-1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------- RequeueJob


async def test_requeue_failed_job_gives_it_a_fresh_attempt_budget(api, moto_s3):
    job = await failed_job(api, moto_s3)
    assert job.status == pb.JOB_STATUS_FAILED and job.attempt == 1

    requeued = await requeue(api, job.job_id)
    assert requeued.status == pb.JOB_STATUS_QUEUED
    assert requeued.attempt == 0 and requeued.progress_pct == 0
    assert not requeued.HasField("error")
    [lease] = await claim(api)
    assert lease.job.job_id == job.job_id and lease.attempt == 1


async def test_requeue_stuck_upload_whose_object_exists(api, moto_s3):
    init = await initiate(api)
    await put_object(moto_s3, init.job.bucket, init.job.key)  # the client never called Complete

    job = await requeue(api, init.job.job_id)
    assert job.status == pb.JOB_STATUS_QUEUED and job.etag
    [lease] = await claim(api)
    assert lease.job.job_id == job.job_id and lease.etag == job.etag


async def test_requeue_stuck_upload_without_object_changes_nothing(api):
    init = await initiate(api)
    before = await get_job(api, init.job.job_id)

    err = await rpc_error(requeue(api, init.job.job_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "REQUEUE_UPLOAD_NOT_VERIFIED"
    assert await get_job(api, init.job.job_id) == before
    assert await claim(api) == []


async def test_requeue_upload_failure_needs_the_object(api, moto_s3):
    init = await initiate(api)
    with pytest.raises(grpc.aio.AioRpcError):
        await complete(api, init.job.job_id)  # failed: UPLOAD_OBJECT_NOT_FOUND
    err = await rpc_error(requeue(api, init.job.job_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_job(api, init.job.job_id)).status == pb.JOB_STATUS_FAILED

    await put_object(moto_s3, init.job.bucket, init.job.key)
    assert (await requeue(api, init.job.job_id)).status == pb.JOB_STATUS_QUEUED


@pytest.mark.parametrize("stage", ["queued", "running", "done"])
async def test_requeue_refuses_jobs_that_are_not_failed_or_stuck(api, moto_s3, stage):
    job = await queued_job(api, moto_s3)
    if stage != "queued":
        [lease] = await claim(api)
        if stage == "done":
            await finish(api, lease)
    before = await get_job(api, job.job_id)

    err = await rpc_error(requeue(api, job.job_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "INVALID_TRANSITION"
    assert await get_job(api, job.job_id) == before


# ----------------------------------------------------------------------------------- CancelJob


async def test_cancel_queued_job_fails_it_with_cancelled(api, moto_s3):
    job = await queued_job(api, moto_s3)
    cancelled = await cancel(api, job.job_id, "customer asked")
    assert cancelled.status == pb.JOB_STATUS_FAILED
    assert cancelled.error.code == "CANCELLED"
    assert "customer asked" in cancelled.error.message
    assert await claim(api) == []


async def test_cancel_stuck_upload(api):
    init = await initiate(api)
    assert (await cancel(api, init.job.job_id)).status == pb.JOB_STATUS_FAILED
    err = await rpc_error(complete(api, init.job.job_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # not an upload failure to retry


async def test_cancel_running_job_asks_its_worker_to_stop(api, moto_s3):
    await queued_job(api, moto_s3)
    [lease] = await claim(api)
    job = await cancel(api, lease.job.job_id)
    assert job.status == pb.JOB_STATUS_QUICK_RUNNING and job.cancel_requested
    beat = await api.worker.Heartbeat(
        pb.HeartbeatRequest(
            worker_id="w-1",
            leases=[pb.LeaseRef(job_id=lease.job.job_id, lease_token=lease.lease_token)],
        ),
        timeout=10,
    )
    assert beat.leases[0].cancel_requested


@pytest.mark.parametrize("stage", ["done", "failed"])
async def test_cancel_finished_job_is_refused(api, moto_s3, stage):
    await queued_job(api, moto_s3)
    [lease] = await claim(api)
    job = await (finish(api, lease) if stage == "done" else fail(api, lease))
    err = await rpc_error(cancel(api, job.job_id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "INVALID_TRANSITION"
    assert await get_job(api, job.job_id) == job


@pytest.mark.parametrize("rpc", ["requeue", "cancel", "watch"])
async def test_unknown_and_malformed_job_ids(api, rpc):
    async def call(job_id: str) -> None:
        if rpc == "watch":
            async for _ in api.upload.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10):
                pass
        else:
            await (requeue if rpc == "requeue" else cancel)(api, job_id)

    err = await rpc_error(call(new_id()))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err) == "JOB_NOT_FOUND"
    err = await rpc_error(call("not-a-uuid"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------ WatchJob


@contextlib.asynccontextmanager
async def watching(api, job_id: str) -> AsyncIterator[asyncio.Queue[pb.Job | None]]:
    """A WatchJob stream feeding a queue; None marks the end of the stream."""
    events: asyncio.Queue[pb.Job | None] = asyncio.Queue()

    async def read() -> None:
        async for resp in api.upload.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60):
            await events.put(resp.job)
        await events.put(None)

    task = asyncio.create_task(read())
    try:
        yield events
        await asyncio.wait_for(task, EVENT_TIMEOUT)  # surfaces a stream error
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def next_event(events: asyncio.Queue[pb.Job | None]) -> tuple[int, int] | None:
    job = await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
    return None if job is None else (job.status, job.progress_pct)


async def test_watch_streams_every_change_until_done(api, moto_s3):
    job = await queued_job(api, moto_s3)
    async with watching(api, job.job_id) as events:
        assert await next_event(events) == (pb.JOB_STATUS_QUEUED, 0)
        [lease] = await claim(api)
        assert await next_event(events) == (pb.JOB_STATUS_QUICK_RUNNING, 0)
        await report(api, lease, pct=30)
        assert await next_event(events) == (pb.JOB_STATUS_QUICK_RUNNING, 30)
        await report(api, lease, pb.JOB_STATUS_QUICK_DONE, 50)
        assert await next_event(events) == (pb.JOB_STATUS_QUICK_DONE, 50)
        await report(api, lease, pb.JOB_STATUS_DEEP_RUNNING, 60)
        assert await next_event(events) == (pb.JOB_STATUS_DEEP_RUNNING, 60)
        await report(api, lease, pct=60)  # no change: no event
        req = pb.CompleteJobRequest(job_id=job.job_id, lease_token=lease.lease_token)
        await api.worker.CompleteJob(req, timeout=10)
        assert await next_event(events) == (pb.JOB_STATUS_DONE, 100)
        assert await next_event(events) is None  # the stream ends at DONE


async def test_watch_ends_at_failed_with_the_error(api, moto_s3):
    job = await queued_job(api, moto_s3)
    async with watching(api, job.job_id) as events:
        assert await next_event(events) == (pb.JOB_STATUS_QUEUED, 0)
        [lease] = await claim(api)
        assert await next_event(events) == (pb.JOB_STATUS_QUICK_RUNNING, 0)
        await cancel(api, job.job_id)
        cancelled = await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
        assert cancelled is not None and cancelled.cancel_requested
        await fail(api, lease, "CANCELLED")
        last = await asyncio.wait_for(events.get(), EVENT_TIMEOUT)
        assert last is not None and last.status == pb.JOB_STATUS_FAILED
        assert last.error.code == "CANCELLED"
        assert await next_event(events) is None


async def test_watch_of_a_finished_job_answers_once_and_ends(api, moto_s3):
    job = await failed_job(api, moto_s3)
    got = [
        r.job async for r in api.upload.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=10)
    ]
    assert [j.status for j in got] == [pb.JOB_STATUS_FAILED]
