"""BatchReportProgress and BatchCompleteJobs: each item answers what its single call would have
(OK, a replay, LEASE_LOST, NOT_FOUND, an invalid item), a malformed batch fails whole and
changes nothing, and batches racing each other or the rescuer keep the fencing the single
calls have. (Their cost, one statement per batch, is in test_lease_hot_path.)"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.support import auth
from tests.support.flows import claim, error_reason, get_job, queued_job
from tests.support.service import lease_ref, settings_for, stubs_for

OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ABORTED = 0, 3, 5, 9, 10
#: Short leases and outage grace; the rescuer runs only when the test says so.
FAST_LEASES = dict(
    lease_seconds=1.0,
    heartbeat_interval_seconds=0.3,
    reaper_interval_seconds=3600.0,
    retry_base_seconds=0.05,
    retry_max_seconds=0.2,
)


def quick(n: int) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"quick": {"n": n}})
    return s


def to_deep(lease: pb.Lease, n: int = 0) -> pb.ReportProgressRequest:
    return pb.ReportProgressRequest(
        **lease_ref(lease), status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=40, result=quick(n)
    )


def done(lease: pb.Lease, uri: str = "") -> pb.CompleteJobRequest:
    return pb.CompleteJobRequest(**lease_ref(lease), results_uri=uri)


async def leases(api, moto_s3, n: int) -> list[pb.Lease]:
    for _ in range(n):
        await queued_job(api, moto_s3)
    got = await claim(api, max_jobs=n)
    assert len(got) == n
    return got


async def report(api, items) -> list[pb.BatchItemResult]:
    resp = await api.worker.BatchReportProgress(
        pb.BatchReportProgressRequest(items=items), timeout=10
    )
    return list(resp.results)


async def complete(api, items) -> list[pb.BatchItemResult]:
    resp = await api.worker.BatchCompleteJobs(pb.BatchCompleteJobsRequest(items=items), timeout=10)
    return list(resp.results)


async def test_a_batch_runs_each_lease_through_quick_deep_and_done(api, moto_s3):
    held = await leases(api, moto_s3, 3)
    reported = await report(api, [to_deep(lease, i) for i, lease in enumerate(held)])
    assert [r.code for r in reported] == [OK, OK, OK]
    assert [r.job_id for r in reported] == [lease.job.job_id for lease in held]
    for i, r in enumerate(reported):
        assert r.job.status == pb.JOB_STATUS_DEEP_RUNNING
        assert r.job.result["quick"]["n"] == i  # each item's own result, not its neighbour's
    completed = await complete(api, [done(lease, f"s3://r/{i}/") for i, lease in enumerate(held)])
    assert [r.code for r in completed] == [OK, OK, OK]
    for i, lease in enumerate(held):
        job = await get_job(api, lease.job.job_id)
        assert job.status == pb.JOB_STATUS_DONE and job.results_uri == f"s3://r/{i}/"
        assert job.result["quick"]["n"] == i  # CompleteJob without a result keeps the quick one


async def test_each_item_answers_what_its_single_call_would(api, moto_s3):
    fresh, replayed, wrong_stage = await leases(api, moto_s3, 3)
    await report(api, [to_deep(fresh), to_deep(replayed)])
    assert [r.code for r in await complete(api, [done(replayed)])] == [OK]
    stale = pb.CompleteJobRequest(job_id=fresh.job.job_id, lease_token=str(uuid.uuid4()))
    missing = pb.CompleteJobRequest(job_id=str(uuid.uuid4()), lease_token=str(uuid.uuid4()))
    garbled = pb.CompleteJobRequest(job_id="not-a-uuid", lease_token=fresh.lease_token)

    results = await complete(api, [stale, done(replayed), missing, garbled, done(wrong_stage)])

    by_code = [(r.code, r.reason) for r in results]
    assert by_code == [
        (ABORTED, "LEASE_LOST"),  # another token: nothing changes
        (OK, ""),  # a repeat of a completion that succeeded
        (NOT_FOUND, "JOB_NOT_FOUND"),
        (INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (FAILED_PRECONDITION, "INVALID_TRANSITION"),  # still in the quick pass
    ], results
    assert "job_id" in results[3].message  # the single call's actionable message
    assert results[1].job.status == pb.JOB_STATUS_DONE
    # The items that failed changed nothing: the lease still holds and finishes normally.
    assert (await get_job(api, fresh.job.job_id)).status == pb.JOB_STATUS_DEEP_RUNNING
    assert [r.code for r in await complete(api, [done(fresh)])] == [OK]
    assert (await get_job(api, wrong_stage.job.job_id)).status == pb.JOB_STATUS_QUICK_RUNNING


async def test_progress_items_keep_the_single_calls_rules(api, moto_s3):
    a, b = await leases(api, moto_s3, 2)
    forward = pb.ReportProgressRequest(**lease_ref(a), status=pb.JOB_STATUS_QUICK_DONE)
    completed = pb.ReportProgressRequest(**lease_ref(b), status=pb.JOB_STATUS_DONE)
    out_of_range = pb.ReportProgressRequest(**lease_ref(b), progress_pct=101)
    results = await report(api, [forward, completed])
    assert [r.code for r in results] == [OK, INVALID_ARGUMENT]
    assert "CompleteJob" in results[1].message
    assert [r.code for r in await report(api, [out_of_range])] == [INVALID_ARGUMENT]
    back = pb.ReportProgressRequest(**lease_ref(a), status=pb.JOB_STATUS_QUICK_RUNNING)
    results = await report(api, [back, to_deep(b)])
    assert [(r.code, r.reason) for r in results] == [
        (FAILED_PRECONDITION, "INVALID_TRANSITION"),
        (OK, ""),
    ]
    assert (await get_job(api, a.job.job_id)).status == pb.JOB_STATUS_QUICK_DONE


@pytest.mark.parametrize("shape", ["empty", "duplicate", "too_many"])
async def test_a_malformed_batch_fails_whole_and_changes_nothing(api, moto_s3, shape):
    (lease,) = await leases(api, moto_s3, 1)
    await report(api, [to_deep(lease)])
    items = {
        "empty": [],
        "duplicate": [done(lease), done(lease)],
        "too_many": [done(lease)]
        + [
            pb.CompleteJobRequest(job_id=str(uuid.uuid4()), lease_token=str(uuid.uuid4()))
            for _ in range(1000)
        ],
    }[shape]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, items)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "INVALID_ARGUMENT"
    assert "items" in err.value.details()
    assert (await get_job(api, lease.job.job_id)).status == pb.JOB_STATUS_DEEP_RUNNING


def transitions_to_done(app: JobServiceApp) -> float:
    return app.metrics.job_transitions_total.labels("done")._value.get()


async def test_overlapping_batches_in_opposite_orders_neither_deadlock_nor_double_finish(
    api, app, moto_s3
):
    held = await leases(api, moto_s3, 12)
    before = transitions_to_done(app)
    for round_ in range(3):
        items = [to_deep(lease, round_) for lease in held]
        forward, backward = await asyncio.gather(
            report(api, items), report(api, list(reversed(items)))
        )
        assert {r.code for r in forward + backward} == {OK}
    items = [done(lease) for lease in held]
    first, second = await asyncio.gather(complete(api, items), complete(api, items[::-1]))
    # Both answer OK for every item (one completes it, the other is its replay); each job is
    # finished once, by one of the two.
    assert {r.code for r in first + second} == {OK}
    assert transitions_to_done(app) - before == len(held)
    for lease in held:
        assert (await get_job(api, lease.job.job_id)).status == pb.JOB_STATUS_DONE


async def test_a_batch_racing_the_rescuer_never_overwrites_the_new_holder(database_url, moto_s3):
    """Leases expire; the rescuer takes them and another worker claims them; the old holder's
    batch (old tokens) and the new holder's batch run at once. Only the new holder's counts."""
    fast = settings_for(database_url, moto_s3, **FAST_LEASES)
    async with JobServiceApp(fast) as app, auth.channel(f"127.0.0.1:{app.port}") as ch:
        api = stubs_for(ch)
        old = await leases(api, moto_s3, 6)
        await report(api, [to_deep(lease) for lease in old])
        async with app.engine.begin() as conn:  # expire them now, as time would
            await conn.execute(
                text(
                    "UPDATE video_analysis_jobs SET lease_expires_at = now() - interval '1 ms' "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": [lease.job.job_id for lease in old]},
            )
        rescued = 0
        async with asyncio.timeout(20):  # the rescuer's outage grace (one lease) from start-up
            while rescued < len(old):
                rescued += await app.leases.rescue_expired()
                await asyncio.sleep(0.05)  # polling the grace out
        new: list[pb.Lease] = []
        async with asyncio.timeout(20):  # the retry backoff
            while len(new) < len(old):
                new += await claim(api, worker_id="w-2", max_jobs=len(old), wait=1)
        assert sorted(lease.job.job_id for lease in new) == sorted(x.job.job_id for x in old)
        assert {lease.job.status for lease in new} == {pb.JOB_STATUS_DEEP_RUNNING}
        stale, fresh = await asyncio.gather(
            complete(api, [done(lease, "s3://old/") for lease in old]),
            complete(api, [done(lease, "s3://new/") for lease in new]),
        )
        assert {(r.code, r.reason) for r in stale} == {(ABORTED, "LEASE_LOST")}
        assert {r.code for r in fresh} == {OK}
        for lease in new:
            job = await get_job(api, lease.job.job_id)
            assert job.status == pb.JOB_STATUS_DONE and job.results_uri == "s3://new/"
