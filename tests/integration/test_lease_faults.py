"""Fault tolerance of the lease path (issue 7): infrastructure failures spend no attempt, an
outage of the database does not take leases from healthy workers, claims whose caller is gone
are handed back, and every transient database error answers UNAVAILABLE or ABORTED.

Faults are real: a TCP proxy in front of Postgres that refuses connections, a real Postgres
restart, real locks, read-only databases, terminated backends and connection limits."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from job_service.domain import errors
from job_service.storage import migrate
from job_service.storage.db import (
    LEASE_APPLICATION_NAME,
    DbFault,
    LeasePool,
    classify,
    domain_error,
)
from localinfra.postgres import PostgresCluster
from tests.support import auth
from tests.support.faults import FaultyProxy
from tests.support.flows import claim, error_reason, queued_job
from tests.support.service import Stubs, sa_url, settings_for, stubs_for

FAST = dict(
    lease_seconds=1.0,
    heartbeat_interval_seconds=0.3,
    reaper_interval_seconds=0.1,
    retry_base_seconds=0.05,
    retry_max_seconds=0.2,
    max_attempts=2,
)


def ref(lease: pb.Lease) -> dict:
    return {"job_id": lease.job.job_id, "lease_token": lease.lease_token}


async def heartbeat(api: Stubs, *leases: pb.Lease, timeout: float = 5) -> list[pb.LeaseStatus]:
    req = pb.HeartbeatRequest(worker_id="w-1", leases=[pb.LeaseRef(**ref(x)) for x in leases])
    return list((await api.worker.Heartbeat(req, timeout=timeout)).leases)


async def to_deep(api: Stubs, lease: pb.Lease) -> pb.Job:
    quick = struct_pb2.Struct()
    quick.update({"quick": {"ok": True}})
    req = pb.ReportProgressRequest(
        **ref(lease), status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=20, result=quick
    )
    return (await api.worker.ReportProgress(req, timeout=5)).job


async def complete_job(api: Stubs, lease: pb.Lease, timeout: float = 5) -> pb.Job:
    req = pb.CompleteJobRequest(**ref(lease), results_uri="s3://videos/r/")
    return (await api.worker.CompleteJob(req, timeout=timeout)).job


async def infra_fail(api: Stubs, lease: pb.Lease, code: str = "DOWNLOAD_FAILED") -> pb.Job:
    req = pb.FailJobRequest(
        **ref(lease),
        error_code=code,
        error_message="S3 answered 503",
        retryable=False,  # ignored for infrastructure failures
        kind=pb.FAILURE_KIND_INFRASTRUCTURE,
    )
    return (await api.worker.FailJob(req, timeout=5)).job


async def wait_until(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)  # polling an observable condition


async def row(dsn: str, job_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow("SELECT * FROM video_analysis_jobs WHERE id = $1", job_id)
    finally:
        await conn.close()


def dsn_of(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def fast(database_url, moto_s3) -> AsyncIterator[tuple[Stubs, JobServiceApp]]:
    settings = settings_for(
        database_url,
        moto_s3,
        **FAST,
        infra_retry_base_seconds=0.05,
        infra_retry_max_seconds=0.1,
        infra_retry_window_seconds=1.5,
    )
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            yield stubs_for(ch), app


# -- 1. two budgets ------------------------------------------------------------------------------


async def test_infrastructure_failures_spend_no_attempt_and_fail_only_after_the_window(
    fast, moto_s3, database_url
):
    api, _ = fast
    job = await queued_job(api, moto_s3)
    first_failure = None
    rounds = 0
    # Many more infrastructure failures than max_attempts (2): none fails the job while the
    # window (1.5 s) lasts, and none counts an attempt.
    while True:
        lease = (await wait_until(lambda: claim(api)))[0]
        assert lease.attempt == 1, "an infrastructure failure spent an attempt"
        after = await infra_fail(api, lease)
        rounds += 1
        if after.status == pb.JOB_STATUS_FAILED:
            break
        assert after.status == pb.JOB_STATUS_QUEUED
        assert after.attempt == 0
        assert after.error.code == "DOWNLOAD_FAILED" and after.error.infrastructure
        assert after.HasField("infrastructure_failing_since")
        since = after.infrastructure_failing_since.ToDatetime()
        first_failure = first_failure or since
        assert since == first_failure, "the window must count from the first failure in a row"
        # The backoff is short and capped (0.1 s here), whatever the number of failures.
        backoff = after.available_at.ToDatetime() - after.updated_at.ToDatetime()
        assert backoff.total_seconds() <= 0.1 + 0.01
    assert rounds > FAST["max_attempts"] + 1
    assert after.error.code == "INFRASTRUCTURE_UNAVAILABLE"
    assert after.error.infrastructure and not after.error.retryable
    assert "DOWNLOAD_FAILED" in after.error.message
    assert after.attempt == 0
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        history = await conn.fetch(
            "SELECT code, infrastructure, attempt FROM video_analysis_job_errors "
            "WHERE job_id = $1 ORDER BY id",
            job.job_id,
        )
    finally:
        await conn.close()
    assert len(history) == rounds
    assert all(r["code"] == "DOWNLOAD_FAILED" and r["infrastructure"] for r in history)


async def test_progress_clears_the_infrastructure_window_and_retries_resume_at_the_stage(
    fast, moto_s3
):
    api, _ = fast
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    after = await infra_fail(api, lease)
    assert after.HasField("infrastructure_failing_since")
    lease = (await wait_until(lambda: claim(api)))[0]
    deep = await to_deep(api, lease)  # a stage transition is progress
    assert deep.status == pb.JOB_STATUS_DEEP_RUNNING
    assert not deep.HasField("infrastructure_failing_since")
    after = await infra_fail(api, lease, code="RESULTS_UPLOAD_FAILED")
    assert after.status == pb.JOB_STATUS_QUICK_DONE  # the quick pass is not redone
    assert after.attempt == 0
    again = (await wait_until(lambda: claim(api)))[0]
    assert again.job.status == pb.JOB_STATUS_DEEP_RUNNING and again.attempt == 1
    # The job's own failures still count, with the usual budget.
    req = pb.FailJobRequest(**ref(again), error_code="INVALID_MEDIA", retryable=False)
    failed = (await api.worker.FailJob(req, timeout=5)).job
    assert (failed.status, failed.error.code, failed.error.infrastructure) == (
        pb.JOB_STATUS_FAILED,
        "INVALID_MEDIA",
        False,
    )


async def test_an_operator_cancel_wins_over_an_infrastructure_retry(fast, moto_s3):
    api, _ = fast
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await api.admin.CancelJob(pb.CancelJobRequest(job_id=lease.job.job_id), timeout=5)
    after = await infra_fail(api, lease)
    assert (after.status, after.error.code) == (pb.JOB_STATUS_FAILED, "CANCELLED")


# -- 2. outage grace -------------------------------------------------------------------------------


@pytest.fixture
async def pg_proxy(pg) -> AsyncIterator[FaultyProxy]:
    proxy = await FaultyProxy("127.0.0.1", pg.port).start()
    yield proxy
    await proxy.stop()


def proxied(database_url: str, proxy: FaultyProxy) -> str:
    parts = urlsplit(database_url)
    return database_url.replace(parts.netloc, f"{parts.username}@{proxy.address}")


class Worker:
    """A healthy worker: heartbeats every interval, whatever the answers, until stopped."""

    def __init__(self, api: Stubs, lease: pb.Lease) -> None:
        self.api, self.lease = api, lease
        self.renewed_at: list[float] = []
        self.lost = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                [status] = await heartbeat(self.api, self.lease, timeout=0.5)
                if status.state == pb.LEASE_STATE_HELD:
                    self.renewed_at.append(time.monotonic())
                else:
                    self.lost = True
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.ABORTED:
                    self.lost = True
            await asyncio.sleep(FAST["heartbeat_interval_seconds"])  # the heartbeat period

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_database_outage_longer_than_a_lease_takes_no_lease_from_a_healthy_worker(
    database_url, moto_s3, pg_proxy
):
    settings = settings_for(
        proxied(database_url, pg_proxy), moto_s3, **FAST, db_connect_timeout_seconds=0.5
    )
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            await queued_job(api, moto_s3)
            await queued_job(api, moto_s3)
            healthy_lease, dead_lease = await claim(api, max_jobs=2)
            healthy = Worker(api, healthy_lease)  # the other worker is dead from here on
            try:
                await wait_until(lambda: _true(len(healthy.renewed_at) >= 2))
                pg_proxy.set_mode("refuse")
                down = time.monotonic()
                # The outage lasts three lease lengths.
                await wait_until(lambda: _true(time.monotonic() - down > 3 * FAST["lease_seconds"]))
                pg_proxy.set_mode("pass")
                back = time.monotonic()
                await wait_until(lambda: _true(any(t > back for t in healthy.renewed_at)))
                assert not healthy.lost
                # The dead worker's lease is not taken in the grace after the outage...
                assert app.metrics.lease_expired_total.labels("requeued")._value.get() == 0
                # ...but one grace later it is, with its attempt counted.
                rescued = (await wait_until(lambda: claim(api, worker_id="rescuer")))[0]
                assert time.monotonic() - back >= app.leases.grace * 0.9
                assert rescued.job.job_id == dead_lease.job.job_id
                assert rescued.attempt == 2 and rescued.job.error.code == "LEASE_EXPIRED"
                assert not healthy.lost
            finally:
                await healthy.stop()
            r = await row(dsn_of(database_url), healthy_lease.job.job_id)
            assert (r["attempts"], r["error_code"]) == (1, None)  # no LEASE_EXPIRED
            await to_deep(api, healthy_lease)
            assert (await complete_job(api, healthy_lease)).status == pb.JOB_STATUS_DONE


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def own_cluster(tmp_path_factory) -> AsyncIterator[PostgresCluster]:
    """A cluster of our own, with a data directory that survives a restart."""
    data = tmp_path_factory.mktemp("restartable") / "data"
    cluster = PostgresCluster(data_dir=data)
    await asyncio.to_thread(cluster.start)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_postgres_restart_takes_no_lease_from_a_healthy_worker(own_cluster, moto_s3):
    own_cluster.create_database("jobs")
    url = sa_url(own_cluster, "jobs")
    await asyncio.to_thread(migrate.upgrade, url)
    settings = settings_for(url, moto_s3, **FAST, db_connect_timeout_seconds=0.5)
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            await queued_job(api, moto_s3)
            lease = (await claim(api))[0]
            healthy = Worker(api, lease)
            try:
                await wait_until(lambda: _true(len(healthy.renewed_at) >= 2))
                down = time.monotonic()
                await asyncio.to_thread(own_cluster.stop)  # fast shutdown
                await wait_until(lambda: _true(time.monotonic() - down > 2 * FAST["lease_seconds"]))
                await asyncio.to_thread(own_cluster.start)
                back = time.monotonic()
                await wait_until(lambda: _true(any(t > back for t in healthy.renewed_at)))
                # Well past a grace after the restart, the lease is still the worker's.
                await wait_until(lambda: _true(time.monotonic() - back > 2 * app.leases.grace))
                assert not healthy.lost
            finally:
                await healthy.stop()
            assert app.metrics.lease_expired_total.labels("requeued")._value.get() == 0
            r = await row(sa_url(own_cluster, "jobs").replace("+asyncpg", ""), lease.job.job_id)
            assert (r["attempts"], r["error_code"]) == (1, None)  # no LEASE_EXPIRED
            await to_deep(api, lease)
            assert (await complete_job(api, lease)).status == pb.JOB_STATUS_DONE


# -- 3. claim hand-back -----------------------------------------------------------------------


async def lease_backends_waiting(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND wait_event_type = 'Lock'",
            LEASE_APPLICATION_NAME,
        )
    finally:
        await conn.close()


async def handed_back(dsn: str, job_id: str) -> bool:
    r = await row(dsn, job_id)
    return (
        r["lease_token"] is None
        and r["status"] == "queued"
        and r["attempts"] == 0
        and r["last_lease_outcome"] == "released"
    )


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_claim_whose_caller_is_gone_is_handed_back(api, app, moto_s3, database_url, how):
    dsn = dsn_of(database_url)
    job = await queued_job(api, moto_s3)
    blocker = await asyncpg.connect(dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        # The claim statement will wait behind this lock: the caller leaves meanwhile.
        await blocker.execute("LOCK TABLE video_analysis_jobs IN EXCLUSIVE MODE")
        call = asyncio.create_task(claim(api, timeout=1.0 if how == "deadline" else 10))
        await wait_until(lambda: lease_backends_waiting(dsn))
        if how == "cancel":
            call.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)) as err:
            await call
        if how == "deadline":
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await tx.commit()  # now the claim goes through, for a caller that is gone
    finally:
        await blocker.close()
    await wait_until(lambda: handed_back(dsn, job.job_id))
    assert app.metrics.leases_handed_back_total._value.get() == 1
    again = (await claim(api))[0]
    assert again.job.job_id == job.job_id and again.attempt == 1


async def _settled(dsn: str, job_id: str) -> bool:
    r = await row(dsn, job_id)
    return r["lease_token"] is None


async def test_server_stop_answers_parked_calls_at_once_and_leases_nothing(database_url, moto_s3):
    settings = settings_for(database_url, moto_s3)
    app = JobServiceApp(settings)
    await app.__aenter__()
    stopped = False
    try:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            calls = [
                asyncio.create_task(claim(api, worker_id=f"w-{n}", wait=15, timeout=20))
                for n in range(5)
            ]
            while app.metrics.claim_waiters._value.get() < 5:
                await asyncio.sleep(0.01)  # waiting for the calls to park
            started = time.monotonic()
            stopping = asyncio.create_task(app.__aexit__(None, None, None))
            results = await asyncio.gather(*calls)
            assert results == [[]] * 5
            assert time.monotonic() - started < 3  # not the 5 s grace, not the 15 s wait
            await stopping
            stopped = True
    finally:
        if not stopped:
            await app.__aexit__(None, None, None)


# -- 4. transient database errors ------------------------------------------------------------------


async def terminate_lease_backends(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = $1",
            LEASE_APPLICATION_NAME,
        )
    finally:
        await conn.close()


async def expect(call, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call()
    assert err.value.code() == code, err.value.details()
    assert error_reason(err.value) == reason
    return err.value


async def test_terminated_backend_answers_unavailable_and_the_retry_is_safe(
    api, moto_s3, database_url
):
    dsn = dsn_of(database_url)
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await to_deep(api, lease)
    await terminate_lease_backends(dsn)  # admin shutdown of every pooled connection
    for _ in range(3):  # as many as the pool may hold
        try:
            done = await complete_job(api, lease)
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert error_reason(err) == "DATABASE_UNAVAILABLE"
    assert done.status == pb.JOB_STATUS_DONE
    assert (await complete_job(api, lease)) == done  # a repeat answers OK


async def test_read_only_database_answers_unavailable(api, moto_s3, database_url, pg):
    dsn = dsn_of(database_url)
    name = urlsplit(dsn).path.lstrip("/")
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    pg.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        await terminate_lease_backends(dsn)
        seen = set()
        for _ in range(4):
            err = await expect(
                lambda: heartbeat(api, lease), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"
            )
            seen.add(err.details())
        assert any("ReadOnlySQLTransactionError, SQLSTATE 25006" in d for d in seen), seen
    finally:
        pg.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await terminate_lease_backends(dsn)
    for _ in range(4):
        try:
            [status] = await heartbeat(api, lease)
            break
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert status.state == pb.LEASE_STATE_HELD


@pytest.mark.parametrize("timeout", ["lock", "statement"])
async def test_lock_and_statement_timeouts_answer_unavailable(database_url, moto_s3, timeout):
    overrides = (
        {"lease_lock_timeout_seconds": 0.2}
        if timeout == "lock"
        else {"lease_lock_timeout_seconds": 5.0, "lease_statement_timeout_seconds": 0.2}
    )
    settings = settings_for(database_url, moto_s3, **overrides)
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            await queued_job(api, moto_s3)
            lease = (await claim(api))[0]
            await to_deep(api, lease)
            blocker = await asyncpg.connect(dsn_of(database_url))
            try:
                async with blocker.transaction():
                    await blocker.execute(
                        "SELECT 1 FROM video_analysis_jobs WHERE id = $1 FOR UPDATE",
                        lease.job.job_id,
                    )
                    err = await expect(
                        lambda: complete_job(api, lease),
                        grpc.StatusCode.UNAVAILABLE,
                        "DATABASE_UNAVAILABLE",
                    )
                    expected = "LockNotAvailable" if timeout == "lock" else "QueryCanceled"
                    assert expected in err.details()
                    assert "nothing was changed" in err.details()
            finally:
                await blocker.close()
            assert (await complete_job(api, lease)).status == pb.JOB_STATUS_DONE


async def test_deadlock_answers_aborted(api, moto_s3, database_url):
    dsn = dsn_of(database_url)
    for _ in range(2):
        await queued_job(api, moto_s3)
    leases = sorted(await claim(api, max_jobs=2), key=lambda x: uuid.UUID(x.job.job_id))
    first, second = leases  # the heartbeat locks rows in job id order: first, then second
    blocker = await asyncpg.connect(dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SET LOCAL deadlock_timeout = '10s'")  # the service detects it
        await blocker.execute(
            "SELECT 1 FROM video_analysis_jobs WHERE id = $1 FOR UPDATE", second.job.job_id
        )
        beat = asyncio.create_task(heartbeat(api, first, second))
        await wait_until(lambda: lease_backends_waiting(dsn))
        # Now we want the row the heartbeat holds, while it waits for ours: a deadlock.
        ours = asyncio.create_task(
            blocker.execute(
                "SELECT 1 FROM video_analysis_jobs WHERE id = $1 FOR UPDATE", first.job.job_id
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await beat
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert error_reason(err.value) == "DATABASE_CONFLICT"
        assert "DeadlockDetected" in err.value.details()
        await ours
        await tx.commit()
    finally:
        await blocker.close()
    statuses = await heartbeat(api, first, second)
    assert [s.state for s in statuses] == [pb.LEASE_STATE_HELD] * 2


async def test_too_many_connections_answers_unavailable(database_url, moto_s3, pg):
    dsn = dsn_of(database_url)
    name = urlsplit(dsn).path.lstrip("/")
    role = f"svc_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE ROLE {role} LOGIN")
    pg.execute(
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
        database=name,
    )
    url = database_url.replace("postgres@", f"{role}@", 1)
    try:
        async with JobServiceApp(settings_for(url, moto_s3)) as app:
            async with auth.channel(f"127.0.0.1:{app.port}") as ch:
                api = stubs_for(ch)
                await queued_job(api, moto_s3)
                lease = (await claim(api))[0]
                pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT 0")
                await terminate_lease_backends(dsn)
                details = set()
                for _ in range(3):
                    err = await expect(
                        lambda: heartbeat(api, lease),
                        grpc.StatusCode.UNAVAILABLE,
                        "DATABASE_UNAVAILABLE",
                    )
                    details.add(err.details())
                assert any("TooManyConnections" in d for d in details), details
                pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
                [status] = await heartbeat(api, lease)
                assert status.state == pb.LEASE_STATE_HELD
    finally:
        pg.execute(f"DROP OWNED BY {role}", database=name)
        pg.execute(f"DROP ROLE {role}")


async def test_connection_lost_mid_statement_is_an_unknown_outcome_and_the_retry_is_safe(
    database_url, moto_s3, pg_proxy
):
    """The connection breaks while CompleteJob waits on a row lock: the caller is told
    UNAVAILABLE with outcome=unknown; the statement did go through on the server, and the
    retry answers OK with the completed job."""
    settings = settings_for(proxied(database_url, pg_proxy), moto_s3)
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            await queued_job(api, moto_s3)
            lease = (await claim(api))[0]
            await to_deep(api, lease)
            dsn = dsn_of(database_url)
            blocker = await asyncpg.connect(dsn)
            try:
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute(
                    "SELECT 1 FROM video_analysis_jobs WHERE id = $1 FOR UPDATE",
                    lease.job.job_id,
                )
                call = asyncio.create_task(complete_job(api, lease))
                await wait_until(lambda: lease_backends_waiting(dsn))
                pg_proxy.set_mode("refuse")  # cut the connection mid-statement
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "may or may not have been made" in err.value.details()
                await tx.commit()
            finally:
                await blocker.close()
            pg_proxy.set_mode("pass")
            for _ in range(4):
                try:
                    done = await complete_job(api, lease)
                    break
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert done.status == pb.JOB_STATUS_DONE


async def test_claim_with_unknown_outcome_leases_nothing_to_nobody(database_url, moto_s3, pg_proxy):
    settings = settings_for(
        proxied(database_url, pg_proxy), moto_s3, lease_lock_timeout_seconds=10.0
    )
    dsn = dsn_of(database_url)
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            job = await queued_job(api, moto_s3)
            blocker = await asyncpg.connect(dsn)
            try:
                tx = blocker.transaction()
                await tx.start()
                await blocker.execute("LOCK TABLE video_analysis_jobs IN EXCLUSIVE MODE")
                call = asyncio.create_task(claim(api))
                await wait_until(lambda: lease_backends_waiting(dsn))
                pg_proxy.set_mode("refuse")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                pg_proxy.set_mode("pass")
                # The orphaned claim would go through once we let go of the lock; the service
                # ends that backend and hands back whatever it granted.
                await tx.commit()
            finally:
                await blocker.close()
            await wait_until(lambda: _settled(dsn, job.job_id))
            r = await row(dsn, job.job_id)
            assert r["status"] == "queued" and r["attempts"] == 0
            again = (await wait_until(lambda: claim(api)))[0]
            assert again.job.job_id == job.job_id and again.attempt == 1


async def test_serialization_failure_is_classified_as_a_conflict(database_url):
    """Provoked for real (the lease path itself runs READ COMMITTED single statements)."""
    dsn = dsn_of(database_url)
    a, b = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await a.execute(
            "CREATE TABLE ser_t (k int PRIMARY KEY, v int); INSERT INTO ser_t VALUES (1, 0)"
        )
        ta = a.transaction(isolation="serializable")
        tb = b.transaction(isolation="serializable")
        await ta.start()
        await tb.start()
        await a.fetchval("SELECT v FROM ser_t WHERE k = 1")
        await b.fetchval("SELECT v FROM ser_t WHERE k = 1")
        await a.execute("UPDATE ser_t SET v = 1 WHERE k = 1")
        await ta.commit()
        with pytest.raises(asyncpg.exceptions.SerializationError) as err:
            await b.execute("UPDATE ser_t SET v = 2 WHERE k = 1")
        await tb.rollback()
    finally:
        await a.close()
        await b.close()
    assert classify(err.value) is DbFault.CONFLICT
    mapped = domain_error(err.value, DbFault.CONFLICT)
    assert isinstance(mapped, errors.DatabaseConflict)
    assert mapped.kind is errors.ErrorKind.ABORTED


# ------------------------------------------------------------- overload is not an outage


def lease_pool(url: str) -> LeasePool:
    # One connection, a 0.5 s wait for it: a queue of 0.1 s statements outlasts the wait.
    return LeasePool(url, size=1, connect_timeout=0.5, lock_timeout=2.0, statement_timeout=10.0)


async def test_an_overloaded_lease_pool_answers_unavailable_but_is_no_outage(database_url):
    # Calls that queue for a busy connection longer than the wait are refused UNAVAILABLE
    # (nothing ran). The database answered others meanwhile, so the instance does not declare
    # it unreachable: no outage grace for the reaper, no "unreachable" for on-call.
    pool = lease_pool(database_url)
    await pool.start()
    try:

        async def slow(conn):
            return await conn.fetchval("SELECT pg_sleep(0.1)")

        outcomes = await asyncio.gather(
            *(pool.run(slow) for _ in range(12)), return_exceptions=True
        )
    finally:
        await pool.close()
    refused = [x for x in outcomes if isinstance(x, BaseException)]
    assert refused and len(refused) < len(outcomes), outcomes
    assert all(isinstance(x, errors.DatabaseUnavailable) for x in refused), refused
    assert all(x.metadata.get("overloaded") == "true" for x in refused)
    assert pool.reachability.outages == 0 and pool.reachability.reachable


async def test_a_partitioned_database_is_still_an_outage(database_url, pg_proxy):
    # The same wait running out while nothing comes back from the database is an outage.
    pool = lease_pool(proxied(database_url, pg_proxy))
    await pool.start()

    holding = asyncio.Event()

    async def one(conn):
        return await conn.fetchval("SELECT 1")

    async def hold(conn):
        holding.set()
        return await conn.fetchval("SELECT 1")

    try:
        assert await pool.run(one) == 1
        pg_proxy.set_mode("partition")
        stuck = asyncio.ensure_future(pool.run(hold))
        await holding.wait()  # it has the only connection; its statement is frozen in flight
        with pytest.raises(errors.DatabaseUnavailable) as refused:
            await pool.run(one)
        assert "overloaded" not in refused.value.metadata
        assert pool.reachability.outages == 1 and not pool.reachability.reachable
        pg_proxy.set_mode("pass")
        assert await asyncio.wait_for(stuck, 10) == 1
        assert pool.reachability.reachable  # and back once it answers
    finally:
        pg_proxy.set_mode("pass")
        await pool.close()
