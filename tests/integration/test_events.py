"""The event outbox and feed: one event per state change that a caller cares about,
written in the change's transaction; a cursor that never skips an event committing late; the
gRPC feed's scoping, resume and validation."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from job_service.auth.policy import Role
from tests.support import auth
from tests.support.events import connect, make_jobs, queue_one_by_one, set_status
from tests.support.flows import claim, error_reason, initiate, queued_job
from tests.support.service import Stubs, backdate, settings_for, stubs_for


async def all_events(api: Stubs, after: str = "", **kw: object) -> list[pb.JobEvent]:
    out: list[pb.JobEvent] = []
    cursor = after
    while True:
        resp = await api.upload.ListEvents(
            pb.ListEventsRequest(after_cursor=cursor, page_size=50, **kw), timeout=10
        )
        out.extend(resp.events)
        if not resp.events:
            return out
        cursor = resp.next_cursor


async def test_each_change_writes_one_event_and_progress_none(
    app: JobServiceApp, api: Stubs, moto_s3
) -> None:
    # queued (upload verified), then done through the lease path.
    done = await queued_job(api, moto_s3)
    [lease] = await claim(api)
    for status, pct in ((pb.JOB_STATUS_QUICK_DONE, 40), (pb.JOB_STATUS_DEEP_RUNNING, 60)):
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(
                job_id=lease.job.job_id, lease_token=lease.lease_token, status=status,
                progress_pct=pct,
            ),
            timeout=5,
        )  # fmt: skip
    result = struct_pb2.Struct()
    result.update({"cuts": 3})
    await api.worker.CompleteJob(
        pb.CompleteJobRequest(
            job_id=lease.job.job_id, lease_token=lease.lease_token, result=result,
            results_uri="s3://videos/results/x/",
        ),
        timeout=5,
    )  # fmt: skip
    # failed (permanent FailJob), then requeued by an operator.
    failing = await queued_job(api, moto_s3)
    [lease2] = await claim(api)
    await api.worker.FailJob(
        pb.FailJobRequest(
            job_id=failing.job_id, lease_token=lease2.lease_token, error_code="BAD_VIDEO",
            error_message="not a video", retryable=False,
        ),
        timeout=5,
    )  # fmt: skip
    await api.admin.RequeueJob(pb.RequeueJobRequest(job_id=failing.job_id), timeout=10)
    # cancelled while queued.
    cancelled = await queued_job(api, moto_s3)
    await api.admin.CancelJob(pb.CancelJobRequest(job_id=cancelled.job_id), timeout=10)
    # upload failed: CompleteUpload with no object.
    missing = (await initiate(api)).job
    with pytest.raises(grpc.aio.AioRpcError):
        await api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=missing.job_id))
    # A rolled-back change writes nothing.
    conn = await connect(app.settings.database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await set_status(conn, [uuid.UUID(missing.job_id)], "done")
        await tx.rollback()
    finally:
        await conn.close()

    events = await all_events(api)
    by_job: dict[str, list[str]] = {}
    for e in events:
        by_job.setdefault(e.job_id, []).append(e.type)
    assert by_job == {
        done.job_id: ["job.queued", "job.done"],
        failing.job_id: ["job.queued", "job.failed", "job.requeued"],
        cancelled.job_id: ["job.queued", "job.cancelled"],
        missing.job_id: ["job.upload_failed"],
    }
    assert len({e.event_id for e in events}) == len(events)
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    done_event = next(e for e in events if e.type == "job.done")
    # The payload is the job as GetJob returned it then.
    assert done_event.job.status == pb.JOB_STATUS_DONE
    assert done_event.job.results_uri == "s3://videos/results/x/"
    assert dict(done_event.job.result) == {"cuts": 3.0}
    upload_failed = next(e for e in events if e.type == "job.upload_failed")
    assert upload_failed.job.error.code.startswith("UPLOAD_")
    assert all(e.owner_subject == auth.UPLOADER for e in events)


async def test_cursor_never_skips_an_event_that_commits_late(app: JobServiceApp, api: Stubs):
    """Transaction A writes its event first (smaller sequence) and commits last; B commits in
    between. A reader that read after B's commit must still get A's event."""
    url = app.settings.database_url
    setup = await connect(url)
    a_conn, b_conn = await connect(url), await connect(url)
    try:
        [ja, jb] = await make_jobs(setup, auth.UPLOADER, 2, own_tenants=True)
        ta = a_conn.transaction()
        await ta.start()
        await set_status(a_conn, [ja], "queued")  # event A written, not committed
        await set_status(b_conn, [jb], "queued")  # event B committed
        seen = await all_events(api)
        assert seen == []  # B is not readable while A, older, is still running
        resp = await api.upload.ListEvents(pb.ListEventsRequest(), timeout=10)
        cursor = resp.next_cursor
        await ta.commit()
        after = await all_events(api, cursor)
        assert [e.job_id for e in after] == [str(ja), str(jb)]
    finally:
        for c in (setup, a_conn, b_conn):
            await c.close()


async def test_racing_transitions_reader_sees_every_event_once_in_commit_order(
    app: JobServiceApp, api: Stubs
) -> None:
    """40 writers each hold a transition's transaction open for a random while; a reader pages
    through the feed all along. It gets every event exactly once, and a transaction that
    committed before another began has the smaller cursor."""
    url = app.settings.database_url
    setup = await connect(url)
    job_ids = await make_jobs(setup, auth.UPLOADER, 40, own_tenants=True)
    await setup.close()
    spans: dict[str, tuple[float, float]] = {}

    async def writer(job_id: uuid.UUID) -> None:
        conn = await connect(url)
        try:
            await asyncio.sleep(random.uniform(0, 1.0))  # spread the starts
            began = time.monotonic()
            async with conn.transaction():
                await set_status(conn, [job_id], "queued")
                await asyncio.sleep(random.uniform(0, 0.15))  # hold the event uncommitted
            spans[str(job_id)] = (began, time.monotonic())
        finally:
            await conn.close()

    got: list[pb.JobEvent] = []
    stop = asyncio.Event()

    async def reader() -> None:
        cursor = ""
        while True:
            finished = stop.is_set()
            resp = await api.upload.ListEvents(
                pb.ListEventsRequest(after_cursor=cursor, page_size=7), timeout=10
            )
            got.extend(resp.events)
            cursor = resp.next_cursor
            if finished and not resp.events:
                return
            await asyncio.sleep(0.01)  # a polling reader's period

    read = asyncio.create_task(reader())
    await asyncio.gather(*(writer(j) for j in job_ids))
    stop.set()
    await read
    assert sorted(e.job_id for e in got) == sorted(str(j) for j in job_ids)  # once each
    cursor_of = {e.job_id: e.cursor for e in got}
    ordered_pairs = 0
    for x, (_, x_commit) in spans.items():
        for y, (y_begin, _) in spans.items():
            if x_commit < y_begin:
                ordered_pairs += 1
                assert cursor_of[x] < cursor_of[y]
    assert ordered_pairs > 0, spans


@pytest.fixture
async def two_uploaders(app: JobServiceApp) -> AsyncIterator[tuple[Stubs, Stubs, Stubs]]:
    addr = f"127.0.0.1:{app.port}"
    async with (
        auth.channel(addr, tokens=auth.as_role(Role.UPLOADER, "alice")) as a,
        auth.channel(addr, tokens=auth.as_role(Role.UPLOADER, "bob")) as b,
        auth.channel(addr, tokens=auth.as_role(Role.OPERATOR)) as op,
    ):
        yield stubs_for(a), stubs_for(b), stubs_for(op)


async def test_feed_resumes_after_disconnect_and_is_scoped(
    app: JobServiceApp, two_uploaders: tuple[Stubs, Stubs, Stubs]
) -> None:
    alice, _bob, operator = two_uploaders
    url = app.settings.database_url
    conn = await connect(url)
    a_jobs = await make_jobs(conn, "alice", 30)
    b_jobs = await make_jobs(conn, "bob", 30)
    await conn.close()
    # Backlog: 10 of each, before anyone streams.
    await queue_one_by_one(url, a_jobs[:10] + b_jobs[:10])

    received: list[pb.JobEvent] = []
    cursor = ""

    async def read_some(n: int) -> None:
        nonlocal cursor
        call = alice.upload.StreamEvents(pb.StreamEventsRequest(after_cursor=cursor))
        async for resp in call:
            received.append(resp.event)
            cursor = resp.event.cursor
            if len(received) % 7 == 0 or len(received) >= n:
                break  # disconnect mid-stream
        call.cancel()

    # Live events arrive while alice keeps reconnecting.
    producer = asyncio.create_task(queue_one_by_one(url, a_jobs[10:] + b_jobs[10:]))
    while len(received) < 30:
        await asyncio.wait_for(read_some(30), 20)
    await producer
    assert [e.job_id for e in received] == [str(j) for j in a_jobs]  # each once, in order
    assert {e.owner_subject for e in received} == {"alice"}
    # The operator sees everybody's.
    everyone = await all_events(operator)
    assert len(everyone) == 60
    # Types filter.
    none = await all_events(operator, types=["job.done"])
    assert none == []


async def test_stream_pushes_without_polling_and_ends_at_max_lifetime(
    database_url, moto_s3
) -> None:
    s = settings_for(database_url, moto_s3, watch_max_seconds=1.5)
    async with JobServiceApp(s) as app, auth.channel(f"127.0.0.1:{app.port}") as ch:
        api = stubs_for(ch)
        conn = await connect(database_url)
        [job] = await make_jobs(conn, auth.UPLOADER, 1)
        call = api.upload.StreamEvents(pb.StreamEventsRequest())
        await asyncio.sleep(0.3)  # the stream is waiting on the NOTIFY
        t0 = time.monotonic()
        await set_status(conn, [job], "queued")
        first = await asyncio.wait_for(call.read(), 5)
        latency = time.monotonic() - t0
        assert first.event.job_id == str(job) and latency < 0.5
        assert await call.read() == grpc.aio.EOF
        assert (await call.code()) == grpc.StatusCode.OK
        assert ("jobs-watch-end", "max-lifetime") in tuple(await call.trailing_metadata())
        # A caller that goes away frees its stream slot at once.
        gone = api.upload.StreamEvents(pb.StreamEventsRequest(types=["job.done"]))
        deadline = time.monotonic() + 5
        while app.gate.streams == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)  # until the service counts the stream
        gone.cancel()
        while app.gate.streams != 0:
            assert time.monotonic() < deadline, "a cancelled stream kept its slot"
            await asyncio.sleep(0.02)  # until the handler ended
        await conn.close()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListEventsRequest(after_cursor="nope"), "after_cursor"),
        (pb.ListEventsRequest(after_cursor="f" * 32), "after_cursor"),
        (pb.ListEventsRequest(page_size=5000), "page_size"),
        (pb.ListEventsRequest(types=["job.done", "job.exploded"]), "types[1]"),
    ],
)
async def test_list_events_validates(api: Stubs, request_, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.upload.ListEvents(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


async def test_stream_events_validates(api: Stubs) -> None:
    call = api.upload.StreamEvents(pb.StreamEventsRequest(after_cursor="zz"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "INVALID_ARGUMENT"


async def test_uploaders_list_their_own_jobs(
    app: JobServiceApp, two_uploaders: tuple[Stubs, Stubs, Stubs]
) -> None:
    alice, bob, operator = two_uploaders
    conn = await connect(app.settings.database_url)
    a_jobs = await make_jobs(conn, "alice", 5)
    await make_jobs(conn, "bob", 3)
    await conn.close()
    seen: list[str] = []
    token = ""
    while True:
        resp = await alice.upload.ListJobs(
            pb.ListJobsRequest(page_size=2, page_token=token), timeout=10
        )
        seen += [j.job_id for j in resp.jobs]
        token = resp.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(str(j) for j in a_jobs)
    # Bob cannot use alice's page token to page through anything.
    first = await alice.upload.ListJobs(pb.ListJobsRequest(page_size=2), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bob.upload.ListJobs(
            pb.ListJobsRequest(page_size=2, page_token=first.next_page_token), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    everyone = await operator.upload.ListJobs(pb.ListJobsRequest(page_size=100), timeout=10)
    assert len(everyone.jobs) == 8


async def test_purge_removes_a_jobs_events_and_retention_old_events(
    app: JobServiceApp, api: Stubs
) -> None:
    conn = await connect(app.settings.database_url)
    try:
        old, kept = await make_jobs(conn, auth.UPLOADER, 2)
        await set_status(conn, [old, kept], "done")
        assert await conn.fetchval("SELECT count(*) FROM job_events") == 2
        await backdate(app, str(old), 3 * 86400)
        resp = await api.admin.PurgeJobs(
            pb.PurgeJobsRequest(older_than=duration_pb2.Duration(seconds=86400)), timeout=30
        )
        assert resp.jobs == 1
        left = await conn.fetch("SELECT job_id FROM job_events")
        assert [r["job_id"] for r in left] == [kept]
        # Retention of events: older than JOB_SERVICE_EVENTS_RETENTION_SECONDS (30 days).
        await conn.execute("UPDATE job_events SET occurred_at = now() - interval '31 days'")
        await app.purge_events()
        assert await conn.fetchval("SELECT count(*) FROM job_events") == 0
        assert await conn.fetchval("SELECT count(*) FROM video_analysis_jobs") == 1
    finally:
        await conn.close()
