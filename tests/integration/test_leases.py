"""The lease protocol on the service side: fencing, batched heartbeats, rescue of expired
leases, resume at the stage reached, retries with backoff, release, cancellation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.conftest import Stubs, settings_for, stubs_for
from tests.support import auth
from tests.support.flows import claim, error_reason, get_job, queued_job

FAST = dict(
    lease_seconds=1.0,
    heartbeat_interval_seconds=0.3,
    reaper_interval_seconds=0.1,
    retry_base_seconds=0.05,
    retry_max_seconds=0.2,
    max_attempts=3,
)


@pytest.fixture
async def fast(database_url, moto_s3) -> AsyncIterator[tuple[Stubs, JobServiceApp]]:
    async with JobServiceApp(settings_for(database_url, moto_s3, **FAST)) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            yield stubs_for(ch), app


def ref(lease: pb.Lease, token: str | None = None) -> dict:
    return {"job_id": lease.job.job_id, "lease_token": token or lease.lease_token}


async def progress(api, lease, status=pb.JOB_STATUS_UNSPECIFIED, pct=0, token=None, result=None):
    req = pb.ReportProgressRequest(**ref(lease, token), status=status, progress_pct=pct)
    if result is not None:
        req.result.CopyFrom(result)
    return (await api.worker.ReportProgress(req, timeout=5)).job


async def complete_job(api, lease, token=None):
    s = struct_pb2.Struct()
    s.update({"cuts": 3})
    req = pb.CompleteJobRequest(**ref(lease, token), result=s, results_uri="s3://videos/r/")
    return (await api.worker.CompleteJob(req, timeout=5)).job


async def fail_job(api, lease, code="FLAKY", retryable=True, token=None):
    req = pb.FailJobRequest(
        **ref(lease, token), error_code=code, error_message=f"{code} happened", retryable=retryable
    )
    return (await api.worker.FailJob(req, timeout=5)).job


async def heartbeat(api, *refs, worker="w-1"):
    req = pb.HeartbeatRequest(worker_id=worker, leases=[pb.LeaseRef(**r) for r in refs])
    return list((await api.worker.Heartbeat(req, timeout=5)).leases)


async def wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)  # polling an observable condition


async def run_to_deep(api, lease):
    await progress(api, lease, pb.JOB_STATUS_QUICK_DONE, 10)
    return await progress(api, lease, pb.JOB_STATUS_DEEP_RUNNING, 10)


async def test_happy_path_through_every_stage(api, moto_s3):
    job = await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    quick = struct_pb2.Struct()
    quick.update({"quick": {"width": 160}})
    j = await progress(api, lease, pb.JOB_STATUS_QUICK_DONE, 10, result=quick)
    assert (j.status, j.stage, j.progress_pct) == (pb.JOB_STATUS_QUICK_DONE, "QUICK_DONE", 10)
    assert j.result["quick"]["width"] == 160  # visible while the deep pass runs
    j = await progress(api, lease, pb.JOB_STATUS_DEEP_RUNNING, 20)
    j = await progress(api, lease, pct=60)
    assert (j.status, j.progress_pct) == (pb.JOB_STATUS_DEEP_RUNNING, 60)
    done = await complete_job(api, lease)
    assert (done.status, done.progress_pct, done.results_uri) == (
        pb.JOB_STATUS_DONE,
        100,
        "s3://videos/r/",
    )
    assert (await get_job(api, job.job_id)).result["cuts"] == 3


async def test_stale_token_is_aborted_and_changes_nothing(api, moto_s3, app):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    stale = str(uuid.uuid4())
    before = await get_job(api, lease.job.job_id)
    calls = [
        lambda: progress(api, lease, pb.JOB_STATUS_QUICK_DONE, 50, token=stale),
        lambda: complete_job(api, lease, token=stale),
        lambda: fail_job(api, lease, token=stale),
        lambda: api.worker.ReleaseJob(pb.ReleaseJobRequest(**ref(lease, stale)), timeout=5),
        lambda: heartbeat(api, ref(lease, stale)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert error_reason(err.value) == "LEASE_LOST"
    after = await get_job(api, lease.job.job_id)
    assert after == before


async def test_repeating_a_successful_call_answers_ok(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await run_to_deep(api, lease)
    first = await complete_job(api, lease)
    again = await complete_job(api, lease)
    assert again == first
    # A different call with the spent token is still refused.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fail_job(api, lease)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "already ended (completed)" in err.value.details()


async def test_heartbeat_renews_many_leases_in_one_call(api, moto_s3):
    for _ in range(3):
        await queued_job(api, moto_s3)
    leases = await claim(api, max_jobs=3)
    stale = {"job_id": leases[2].job.job_id, "lease_token": str(uuid.uuid4())}
    statuses = await heartbeat(api, ref(leases[0]), ref(leases[1]), stale)
    assert [s.job_id for s in statuses] == [lease.job.job_id for lease in leases]
    assert [s.state for s in statuses] == [
        pb.LEASE_STATE_HELD,
        pb.LEASE_STATE_HELD,
        pb.LEASE_STATE_LOST,
    ]
    assert statuses[0].lease_expires_at.ToDatetime() >= leases[0].lease_expires_at.ToDatetime()


async def test_heartbeats_keep_a_job_alive_past_several_lease_lengths(fast, moto_s3):
    api, app = fast
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    started = time.monotonic()
    while time.monotonic() - started < 4 * FAST["lease_seconds"]:
        [status] = await heartbeat(api, ref(lease))
        assert status.state == pb.LEASE_STATE_HELD
        await asyncio.sleep(FAST["heartbeat_interval_seconds"])  # the worker's heartbeat period
    assert app.metrics.lease_expired_total.labels("requeued")._value.get() == 0
    await run_to_deep(api, lease)
    assert (await complete_job(api, lease)).status == pb.JOB_STATUS_DONE


async def test_expired_lease_is_rescued_and_the_old_token_is_fenced(fast, moto_s3):
    api, app = fast
    job = await queued_job(api, moto_s3)
    first = (await claim(api, worker_id="crashed"))[0]
    # No heartbeats: the lease expires, the reaper requeues, another worker claims.
    second = (await wait_until(lambda: claim(api, worker_id="rescuer")))[0]
    assert second.job.job_id == job.job_id
    assert second.attempt == 2 and second.lease_token != first.lease_token
    assert second.job.error.code == "LEASE_EXPIRED"
    assert app.metrics.lease_expired_total.labels("requeued")._value.get() == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await progress(api, first, pb.JOB_STATUS_QUICK_DONE, 10)
    assert err.value.code() == grpc.StatusCode.ABORTED
    await run_to_deep(api, second)
    assert (await complete_job(api, second)).status == pb.JOB_STATUS_DONE


async def test_rescued_deep_pass_resumes_at_the_deep_pass(fast, moto_s3):
    api, _ = fast
    await queued_job(api, moto_s3)
    first = (await claim(api, worker_id="crashed"))[0]
    await run_to_deep(api, first)
    second = (await wait_until(lambda: claim(api, worker_id="rescuer")))[0]
    assert second.job.status == pb.JOB_STATUS_DEEP_RUNNING  # quick pass is not redone
    assert second.attempt == 2


async def test_lease_expiring_on_the_last_attempt_fails_the_job(fast, moto_s3):
    api, _ = fast
    job = await queued_job(api, moto_s3)
    for attempt in range(1, FAST["max_attempts"] + 1):
        lease = (await wait_until(lambda a=attempt: claim(api, worker_id=f"crash-{a}")))[0]
        assert lease.attempt == attempt

    async def failed():
        j = await get_job(api, job.job_id)
        return j if j.status == pb.JOB_STATUS_FAILED else None

    final = await wait_until(failed)
    assert final.error.code == "LEASE_EXPIRED"
    assert "gave up after 3 attempts" in final.error.message


async def test_rescue_never_overwrites_a_completion(fast, moto_s3):
    """Race CompleteJob against the rescuer on leases that have just expired."""
    api, app = fast
    outcomes = []
    for _ in range(8):
        job = await queued_job(api, moto_s3)
        lease = (await claim(api))[0]
        assert lease.job.job_id == job.job_id
        await run_to_deep(api, lease)
        async with app.engine.begin() as conn:  # expire it now, as time would
            await conn.execute(
                text(
                    "UPDATE video_analysis_jobs SET lease_expires_at = now() - interval '1 ms' "
                    "WHERE id = :id"
                ),
                {"id": job.job_id},
            )
        completion, *_ = await asyncio.gather(
            complete_job(api, lease),
            app.leases.rescue_expired(),
            app.leases.rescue_expired(),
            return_exceptions=True,
        )
        final = await get_job(api, job.job_id)
        if isinstance(completion, grpc.aio.AioRpcError):
            assert completion.code() == grpc.StatusCode.ABORTED
            assert final.status == pb.JOB_STATUS_QUICK_DONE  # rescued, resumes at deep
            outcomes.append("rescued")
        else:
            assert final.status == pb.JOB_STATUS_DONE  # the completion stands
            outcomes.append("completed")
        if final.status != pb.JOB_STATUS_DONE:  # out of the way of the next round
            await api.admin.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=5)
    assert len(outcomes) == 8  # both outcomes are legal; a mixed state never is


async def test_retryable_failure_backs_off_then_fails_after_max_attempts(fast, moto_s3, app):
    api, fast_app = fast
    job = await queued_job(api, moto_s3)
    for attempt in range(1, FAST["max_attempts"] + 1):
        lease = (await wait_until(lambda: claim(api)))[0]
        assert lease.attempt == attempt
        after = await fail_job(api, lease, code=f"FLAKY_{attempt}")
        if attempt < FAST["max_attempts"]:
            assert after.status == pb.JOB_STATUS_QUEUED
            assert after.available_at.ToDatetime() > after.updated_at.ToDatetime()  # backoff
    assert after.status == pb.JOB_STATUS_FAILED
    assert after.error.code == "FLAKY_3" and after.error.retryable
    assert "gave up after 3 attempts" in after.error.message
    async with fast_app.engine.connect() as conn:
        codes = (
            (
                await conn.execute(
                    text(
                        "SELECT code FROM video_analysis_job_errors WHERE job_id = :id ORDER BY id"
                    ),
                    {"id": job.job_id},
                )
            )
            .scalars()
            .all()
        )
    assert codes == ["FLAKY_1", "FLAKY_2", "FLAKY_3"]  # the history is kept


async def test_permanent_failure_fails_at_once(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    job = await fail_job(api, lease, code="INVALID_MEDIA", retryable=False)
    assert (job.status, job.error.code, job.attempt) == (pb.JOB_STATUS_FAILED, "INVALID_MEDIA", 1)
    assert await claim(api) == []


async def test_retry_after_quick_pass_resumes_at_deep(fast, moto_s3):
    api, _ = fast
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await run_to_deep(api, lease)
    assert (await fail_job(api, lease)).status == pb.JOB_STATUS_QUICK_DONE
    again = (await wait_until(lambda: claim(api)))[0]
    assert again.job.status == pb.JOB_STATUS_DEEP_RUNNING


async def test_release_hands_the_job_back_without_counting_an_attempt(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    req = pb.ReleaseJobRequest(**ref(lease), reason="shutdown")
    job = (await api.worker.ReleaseJob(req, timeout=5)).job
    assert (job.status, job.attempt) == (pb.JOB_STATUS_QUEUED, 0)
    assert (await api.worker.ReleaseJob(req, timeout=5)).job == job  # repeat: OK
    again = (await claim(api))[0]
    assert again.attempt == 1 and again.lease_token != lease.lease_token


async def test_forbidden_progress_and_completion(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete_job(api, lease)  # the deep pass has not run
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "INVALID_TRANSITION"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await progress(api, lease, pb.JOB_STATUS_DEEP_RUNNING)  # skips quick_done
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for bad in (dict(status=pb.JOB_STATUS_DONE), dict(pct=101), dict(pct=-1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await progress(api, lease, **bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fail_job(api, lease, code="not snake")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_stage_hard_cap_stops_renewal(database_url, moto_s3):
    settings = settings_for(database_url, moto_s3, **{**FAST, "stage_timeout_seconds": 0.5})
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            await queued_job(api, moto_s3)
            lease = (await claim(api))[0]
            [ok] = await heartbeat(api, ref(lease))
            assert ok.state == pb.LEASE_STATE_HELD
            await asyncio.sleep(0.6)  # let the stage run past its cap
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await heartbeat(api, ref(lease))
            assert err.value.code() == grpc.StatusCode.ABORTED


async def test_cancel_reaches_the_worker_through_its_heartbeat(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    job = (await api.admin.CancelJob(pb.CancelJobRequest(job_id=lease.job.job_id), timeout=5)).job
    assert job.cancel_requested and job.status == pb.JOB_STATUS_QUICK_RUNNING
    [status] = await heartbeat(api, ref(lease))
    assert status.cancel_requested
    failed = await fail_job(api, lease, code="CANCELLED", retryable=True)
    assert (failed.status, failed.error.code) == (pb.JOB_STATUS_FAILED, "CANCELLED")
