"""The lease path's costs, counted by the database itself (pg_stat_statements on a cluster of
our own): one statement per lease RPC, O(1) queries for any number of parked ClaimJob calls,
heartbeats as HOT updates, the claim on the partial index whatever the history. Plus the
one-call quick -> deep report and the relative lease TTL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from job_service.storage import migrate
from job_service.storage.db import LEASE_APPLICATION_NAME
from job_service.storage.lease_sql import SQL_CLAIM_FAIR, SQL_CLAIM_FIFO
from job_service.storage.tables import CHANGED_CHANNEL
from localinfra.postgres import PostgresCluster
from tests.support import auth
from tests.support.flows import claim, error_reason, queued_job
from tests.support.service import Stubs, sa_url, settings_for, stubs_for

QUIET = dict(
    # Background work that would show up in the counts: the reaper and the gauges, and the
    # webhook relay (woken by every event; its statements are not the lease path's).
    reaper_interval_seconds=3600.0,
    webhook_delivery=False,
)


@pytest.fixture(scope="module")
def stats_pg() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(
        settings={
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "top",
        }
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def stats_db(stats_pg: PostgresCluster) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    stats_pg.create_database(name)
    url = sa_url(stats_pg, name)
    await asyncio.to_thread(migrate.upgrade, url)
    stats_pg.execute("CREATE EXTENSION pg_stat_statements", database=name)
    yield url
    stats_pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def counted(stats_db, moto_s3) -> AsyncIterator[tuple[Stubs, JobServiceApp, Counter]]:
    async with JobServiceApp(settings_for(stats_db, moto_s3, **QUIET)) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            counter = Counter(stats_db.replace("postgresql+asyncpg://", "postgresql://", 1))
            await counter.open()
            try:
                yield stubs_for(ch), app, counter
            finally:
                await counter.close()


class Counter:
    """Statements the service ran in its database, from pg_stat_statements."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.conn = await asyncpg.connect(self.dsn)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def reset(self) -> None:
        assert self.conn is not None
        await self.conn.execute("SELECT pg_stat_statements_reset()")

    async def statements(self) -> dict[str, int]:
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT query, calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = current_database() AND query NOT LIKE '%pg_stat_statements%'"
        )
        return {r["query"]: r["calls"] for r in rows}

    async def total(self) -> int:
        return sum((await self.statements()).values())


async def gauges_ran(app: JobServiceApp) -> None:
    """The gauges task runs at start-up and then every 15 s: out of the way of a count."""
    while not next(iter(app.metrics.jobs_by_status.collect())).samples:
        await asyncio.sleep(0.01)  # waiting for its first run
    await asyncio.sleep(0.1)  # its transaction ends after the gauges are set


def ref(lease: pb.Lease) -> dict:
    return {"job_id": lease.job.job_id, "lease_token": lease.lease_token}


def quick_result() -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"quick": {"width": 160}})
    return s


async def cycle(api: Stubs, lease: pb.Lease) -> pb.Job:
    """The worker cycle in three calls after the claim: heartbeat, quick -> deep, complete."""
    await api.worker.Heartbeat(
        pb.HeartbeatRequest(worker_id="w-1", leases=[pb.LeaseRef(**ref(lease))]), timeout=5
    )
    await api.worker.ReportProgress(
        pb.ReportProgressRequest(
            **ref(lease), status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=30, result=quick_result()
        ),
        timeout=5,
    )
    resp = await api.worker.CompleteJob(pb.CompleteJobRequest(**ref(lease)), timeout=5)
    return resp.job


async def test_each_lease_call_is_one_statement(counted, moto_s3):
    api, app, counter = counted
    await gauges_ran(app)
    for _ in range(2):
        await queued_job(api, moto_s3)
    # Warm up: the pool's connection exists and has its statements prepared.
    assert (await cycle(api, (await claim(api))[0])).status == pb.JOB_STATUS_DONE
    await counter.reset()
    lease = (await claim(api))[0]
    done = await cycle(api, lease)
    assert done.status == pb.JOB_STATUS_DONE
    counts = await counter.statements()
    # ClaimJob, Heartbeat, ReportProgress (quick -> deep), CompleteJob: one statement each,
    # no BEGIN / COMMIT, no read before the write.
    assert sum(counts.values()) == 4, "\n".join(f"{v}: {k[:90]!r}" for k, v in counts.items())


async def test_get_job_is_one_statement(counted, moto_s3):
    api, app, counter = counted
    await gauges_ran(app)
    job = await queued_job(api, moto_s3)
    req = pb.GetJobRequest(job_id=job.job_id)
    await api.upload.GetJob(req, timeout=5)  # warm up: the statement is prepared
    await counter.reset()
    got = (await api.upload.GetJob(req, timeout=5)).job
    assert got.job_id == job.job_id and got.status == pb.JOB_STATUS_QUEUED
    # One SELECT in autocommit: no BEGIN / COMMIT (or ROLLBACK) around it.
    assert await counter.total() == 1, await counter.statements()


async def test_fail_job_is_one_statement_whichever_way_it_ends(counted, moto_s3):
    api, app, counter = counted
    await gauges_ran(app)
    for _ in range(3):
        await queued_job(api, moto_s3)

    async def fail(lease: pb.Lease, retryable: bool) -> pb.Job:
        req = pb.FailJobRequest(
            **ref(lease), error_code="ANALYSIS_FAILED", error_message="x", retryable=retryable
        )
        return (await api.worker.FailJob(req, timeout=5)).job

    await fail((await claim(api))[0], False)  # warm up: the statement is prepared
    for retryable, status in ((True, pb.JOB_STATUS_QUEUED), (False, pb.JOB_STATUS_FAILED)):
        lease = (await claim(api))[0]
        await counter.reset()
        assert (await fail(lease, retryable)).status == status
        # The decision, the write and the history row: one statement, no read before it.
        assert await counter.total() == 1, await counter.statements()


async def test_a_batch_is_one_statement_whatever_its_size(counted, moto_s3):
    api, app, counter = counted
    await gauges_ran(app)
    for _ in range(6):
        await queued_job(api, moto_s3)

    async def report(held: list[pb.Lease]) -> pb.BatchReportProgressResponse:
        items = [
            pb.ReportProgressRequest(
                **ref(lease),
                status=pb.JOB_STATUS_DEEP_RUNNING,
                progress_pct=30,
                result=quick_result(),
            )
            for lease in held
        ]
        return await api.worker.BatchReportProgress(
            pb.BatchReportProgressRequest(items=items), timeout=5
        )

    async def complete(held: list[pb.Lease]) -> pb.BatchCompleteJobsResponse:
        items = [pb.CompleteJobRequest(**ref(lease)) for lease in held]
        return await api.worker.BatchCompleteJobs(
            pb.BatchCompleteJobsRequest(items=items), timeout=5
        )

    # Warm up: the pool's connection has the batch statements prepared and their types known.
    warm = await claim(api)
    await report(warm)
    await complete(warm)
    held = await claim(api, max_jobs=5)
    await counter.reset()
    assert [r.code for r in (await report(held)).results] == [0] * 5
    assert await counter.total() == 1, await counter.statements()
    await counter.reset()
    assert [r.job.status for r in (await complete(held)).results] == [pb.JOB_STATUS_DONE] * 5
    assert await counter.total() == 1, await counter.statements()


async def test_a_miss_costs_one_diagnostic_read_and_answers_as_before(counted, moto_s3):
    api, app, counter = counted
    await gauges_ran(app)
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await counter.reset()
    stale = pb.CompleteJobRequest(job_id=lease.job.job_id, lease_token=str(uuid.uuid4()))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.CompleteJob(stale, timeout=5)
    assert err.value.code() == grpc.StatusCode.ABORTED and error_reason(err.value) == "LEASE_LOST"
    assert await counter.total() == 2  # the conditional update, then the locked read


async def test_a_thousand_parked_calls_cost_o1_queries(counted, moto_s3):
    api, app, counter = counted
    n = 1000

    async def parked(i: int) -> list[pb.Lease]:
        return await claim(api, worker_id=f"w-{i}", wait=12, timeout=20)

    calls = [asyncio.create_task(parked(i)) for i in range(n)]
    while app.metrics.claim_waiters._value.get() < n:
        await asyncio.sleep(0.05)  # waiting for the calls to park
    await counter.reset()
    window = 6.0
    await asyncio.sleep(window)  # the idle period being measured
    idle = await counter.total()
    assert idle <= 2 * window, await counter.statements()  # at most ~2 queries/s per instance
    # Parked, not dead: a job still reaches one of them at once.
    job = await queued_job(api, moto_s3)
    results = await asyncio.gather(*calls)
    got = [lease.job.job_id for r in results for lease in r]
    assert got == [job.job_id]


async def test_new_calls_park_without_querying_while_the_queue_is_known_empty(counted):
    api, app, counter = counted
    assert await claim(api) == []  # learns that nothing is claimable
    assert app.waiters.may_be_claimable is False
    await counter.reset()
    await asyncio.gather(*(claim(api, worker_id=f"w-{i}", wait=0.5) for i in range(50)))
    claims = sum(n for q, n in (await counter.statements()).items() if q.startswith("WITH picked"))
    assert claims == 0


async def test_heartbeats_are_hot_updates(counted, moto_s3, stats_db):
    api, _, _ = counted
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    dsn = stats_db.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:

        async def table_stats() -> tuple[int, int]:
            # Backends flush their statistics when they exit: end the lease path's.
            await conn.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE application_name = $1",
                LEASE_APPLICATION_NAME,
            )
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            r = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'video_analysis_jobs'"
            )
            return r["n_tup_upd"], r["n_tup_hot_upd"]

        before = await table_stats()
        beats = 0
        while beats < 30:
            try:
                await api.worker.Heartbeat(
                    pb.HeartbeatRequest(worker_id="w-1", leases=[pb.LeaseRef(**ref(lease))]),
                    timeout=5,
                )
                beats += 1
            except grpc.aio.AioRpcError as e:  # the pooled connection we just terminated
                assert e.code() == grpc.StatusCode.UNAVAILABLE
        after = await table_stats()
    finally:
        await conn.close()
    updates, hot = after[0] - before[0], after[1] - before[1]
    assert updates == beats
    assert hot == updates, f"{hot} of {updates} heartbeat updates were HOT"


async def test_claim_uses_the_partial_index_whatever_the_history(counted, stats_db):
    _, _, _ = counted
    dsn = stats_db.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO video_sessions (id) VALUES ('00000000-0000-0000-0000-000000000001');
            INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename,
                content_type, size_bytes, s3_bucket, s3_key)
            SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 'done', 'DONE',
                   'a.mp4', 'video/mp4', 1, 'videos', 'k' || g
            FROM generate_series(1, 50000) g;
            ANALYZE video_analysis_jobs;
            """
        )
        plans = {
            index: "\n".join(
                r[0]
                for r in await conn.fetch(
                    "EXPLAIN " + sql,
                    ["w-1"] * 10,
                    10,
                    [uuid.uuid4() for _ in range(10)],
                    30.0,
                )
            )
            for index, sql in (
                ("ix_video_analysis_jobs_fair", SQL_CLAIM_FAIR),
                ("ix_video_analysis_jobs_claimable", SQL_CLAIM_FIFO),
            )
        }
    finally:
        await conn.close()
    for index, plan in plans.items():  # the fair claim (default) and FIFO alike
        # With nothing queued the planner may pick the (equally empty) live-jobs partial index
        # for the fair claim; with a backlog it takes the fair index (tests/bench/fairness.py
        # shows the plan over 1M queued jobs). Either way: a partial index, never the history.
        assert index in plan or "ix_video_analysis_jobs_live_owner" in plan, plan
        assert "Seq Scan on video_analysis_jobs" not in plan, plan


async def test_quick_results_and_the_deep_pass_in_one_call(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    assert lease.lease_ttl.ToTimedelta().total_seconds() == 30.0
    req = pb.ReportProgressRequest(
        **ref(lease), status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=30, result=quick_result()
    )
    job = (await api.worker.ReportProgress(req, timeout=5)).job
    assert (job.status, job.stage, job.progress_pct) == (
        pb.JOB_STATUS_DEEP_RUNNING,
        "DEEP_RUNNING",
        30,
    )
    assert job.result["quick"]["width"] == 160
    again = (await api.worker.ReportProgress(req, timeout=5)).job  # a retried call: OK
    assert again.status == pb.JOB_STATUS_DEEP_RUNNING
    beat = await api.worker.Heartbeat(
        pb.HeartbeatRequest(worker_id="w-1", leases=[pb.LeaseRef(**ref(lease))]), timeout=5
    )
    assert beat.leases[0].lease_ttl.ToTimedelta().total_seconds() == 30.0
    done = (await api.worker.CompleteJob(pb.CompleteJobRequest(**ref(lease)), timeout=5)).job
    assert done.status == pb.JOB_STATUS_DONE and done.result["quick"]["width"] == 160


async def test_changes_notify_only_for_watched_jobs(api, app, moto_s3, database_url):
    """Postgres serialises the commits of notifying transactions: the lease path's updates of
    jobs nobody watches send no change notification; a watched job's still do, at once."""
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.add_listener(CHANGED_CHANNEL, lambda *a: heard.put_nowait(a[3]))
        await queued_job(api, moto_s3)
        lease = (await claim(api))[0]
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(
                **ref(lease),
                status=pb.JOB_STATUS_DEEP_RUNNING,
                progress_pct=30,
                result=quick_result(),
            ),
            timeout=5,
        )
        await conn.execute(f"NOTIFY {CHANGED_CHANNEL}, 'sentinel'")  # delivered in commit order
        assert await asyncio.wait_for(heard.get(), 5) == "sentinel"
        # Now somebody watches: its next change is notified (and pushed to the stream).
        stream = api.upload.WatchJob(pb.WatchJobRequest(job_id=lease.job.job_id), timeout=20)
        first = await stream.read()
        assert first.job.progress_pct == 30
        while not await conn.fetchval(
            "SELECT count(*) FROM video_analysis_job_watches WHERE job_id = $1", lease.job.job_id
        ):
            await asyncio.sleep(0.01)  # the registration is written by the listener
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(**ref(lease), progress_pct=60), timeout=5
        )
        assert await asyncio.wait_for(heard.get(), 5) == lease.job.job_id
        while (update := await asyncio.wait_for(stream.read(), 3)).job.progress_pct != 60:
            pass  # the registration itself may have woken the stream once
        assert update.job.progress_pct == 60
        stream.cancel()
    finally:
        await conn.close()


async def test_a_backoff_set_before_the_instance_listened_is_found_without_parked_calls(
    counted, moto_s3, stats_db
):
    """wait=0 callers while the instance "knows" the queue is empty: a job whose backoff was set
    before this instance listened (no timer for it) is still found, by the slow tick."""
    api, app, _ = counted
    await queued_job(api, moto_s3)
    dsn = stats_db.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    try:  # as if another instance had requeued it with a backoff long ago, unheard here
        await conn.execute(
            "ALTER TABLE video_analysis_jobs DISABLE TRIGGER video_analysis_jobs_claimable; "
            "UPDATE video_analysis_jobs SET available_at = now() + interval '1 s'; "
            "ALTER TABLE video_analysis_jobs ENABLE TRIGGER video_analysis_jobs_claimable"
        )
    finally:
        await conn.close()
    assert await claim(api) == []
    assert app.waiters.may_be_claimable is False
    found: list[pb.Lease] = []
    for _ in range(200):
        found = await claim(api)  # wait=0: never parks
        if found:
            break
        await asyncio.sleep(0.05)  # a worker polling without long-poll
    assert found, "the due job was never found"
