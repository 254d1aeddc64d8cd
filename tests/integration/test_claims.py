"""ClaimJob: never one job to two callers, max_jobs honoured, long-poll woken by NOTIFY."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from job_service.rpc.servicers import MAX_CLAIM_REPLY_BYTES
from tests.support import auth
from tests.support.flows import claim, complete, initiate, put_object, queued_job
from tests.support.service import claim_count, stubs_for


async def test_max_jobs_is_honoured_and_oldest_first(api, moto_s3):
    jobs = [await queued_job(api, moto_s3) for _ in range(5)]
    first = await claim(api, max_jobs=3)
    assert [lease.job.job_id for lease in first] == [j.job_id for j in jobs[:3]]
    rest = await claim(api, max_jobs=10)
    assert [lease.job.job_id for lease in rest] == [j.job_id for j in jobs[3:]]
    assert len({lease.lease_token for lease in first + rest}) == 5


async def test_racing_claimers_on_two_service_instances_claim_each_job_once(
    api, app, moto_s3, settings
):
    n_jobs = 60
    expected = {(await queued_job(api, moto_s3)).job_id for _ in range(n_jobs)}
    async with JobServiceApp(settings) as other:
        async with auth.channel(f"127.0.0.1:{other.port}") as ch2:
            apis = [api, stubs_for(ch2)]

            async def claimer(i: int) -> list[str]:
                got: list[str] = []
                while True:
                    leases = await claim(apis[i % 2], worker_id=f"w-{i}", max_jobs=3)
                    if not leases:
                        return got
                    got += [lease.job.job_id for lease in leases]

            results = await asyncio.gather(*(claimer(i) for i in range(10)))
    claimed = [job_id for r in results for job_id in r]
    assert len(claimed) == n_jobs, "a job was handed out twice or lost"
    assert set(claimed) == expected
    assert sum(1 for r in results if r) > 1, "the race did not happen: one claimer took all"


async def test_long_poll_returns_when_a_job_becomes_claimable(api, moto_s3, app):
    init = await initiate(api)
    await put_object(moto_s3, init.job.bucket, init.job.key)
    started = time.monotonic()
    waiting = asyncio.create_task(claim(api, wait=15, timeout=20))
    # The call is parked, not answered.
    while app.metrics.claim_waiters._value.get() < 1:
        await asyncio.sleep(0.01)  # waiting for the call to park
    assert not waiting.done()
    await complete(api, init.job.job_id)
    leases = await asyncio.wait_for(waiting, 5)
    assert [lease.job.job_id for lease in leases] == [init.job.job_id]
    assert time.monotonic() - started < 5  # woken by NOTIFY, not by the 15 s wait running out


async def test_long_poll_answers_empty_after_wait(api):
    started = time.monotonic()
    assert await claim(api, wait=1.0) == []
    assert 0.9 <= time.monotonic() - started < 5


async def test_waiting_calls_do_not_poll_the_database(api, app):
    """Ten parked calls for 2 s: each queries once when it arrives, then waits for a wake-up."""
    before = app.metrics.claim_seconds._sum.get(), claim_count(app)
    await asyncio.gather(*(claim(api, worker_id=f"w-{i}", wait=2.0) for i in range(10)))
    assert claim_count(app) - before[1] <= 10 + 2  # one each, plus at most a tick's wake-up


async def test_one_notification_wakes_one_waiter(api, moto_s3, app):
    tasks = [
        asyncio.create_task(claim(api, worker_id=f"w-{i}", wait=3, timeout=10)) for i in range(5)
    ]
    while app.metrics.claim_waiters._value.get() < 5:
        await asyncio.sleep(0.01)  # waiting for the calls to park
    await queued_job(api, moto_s3)
    results = await asyncio.gather(*tasks)
    assert sorted(len(r) for r in results) == [0, 0, 0, 0, 1]


async def test_wait_is_kept_below_the_callers_deadline(api):
    started = time.monotonic()
    # Asks to wait 30 s with a 3 s deadline: the server answers (empty) before the deadline.
    assert await claim(api, wait=30, timeout=3) == []
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"worker_id": "", "max_jobs": 1}, "worker_id"),
        ({"worker_id": "w", "max_jobs": 0}, "max_jobs"),
        ({"worker_id": "w" * 201, "max_jobs": 1}, "worker_id"),
    ],
)
async def test_claim_validation(api, request_fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.ClaimJob(pb.ClaimJobRequest(**request_fields), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


async def test_max_jobs_is_capped_by_the_server(api, moto_s3, database_url):
    for _ in range(4):
        await queued_job(api, moto_s3)
    from tests.support.service import settings_for

    async with JobServiceApp(settings_for(database_url, moto_s3, claim_max_jobs=2)) as capped:
        async with auth.channel(f"127.0.0.1:{capped.port}") as ch:
            assert len(await claim(stubs_for(ch), max_jobs=100)) == 2


async def test_a_claim_of_20_large_results_stays_under_the_message_limit(
    api, moto_s3, database_url
):
    """Jobs resumed after their quick pass carry their stored results (up to 256 KiB each):
    a claim of 20 such jobs would be ~5 MiB, past the 4 MiB every client refuses by default.
    The reply is bounded by size; the surplus is queued again before the answer, at the stage
    reached, with no attempt spent, and later claims hand it out."""
    ids = [uuid.UUID((await queued_job(api, moto_s3)).job_id) for _ in range(20)]
    big = json.dumps({"quick": {"blob": "x" * (250 * 1024)}})
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql", 1))
    try:
        await conn.execute(
            "UPDATE video_analysis_jobs SET status = 'quick_done', stage = 'QUICK_DONE', "
            "result = $2::jsonb, attempts = 1 WHERE id = ANY($1::uuid[])",
            ids,
            big,
        )
        got: list[pb.Lease] = []
        replies = 0
        while len(got) < 20 and replies < 10:
            # The client's default 4 MiB receive limit: a reply over it fails the call.
            leases = await claim(api, worker_id=f"w-{replies}", max_jobs=20)
            replies += 1
            assert 0 < len(leases) < 20
            assert pb.ClaimJobResponse(leases=leases).ByteSize() <= MAX_CLAIM_REPLY_BYTES
            assert all(len(le.job.result.fields["quick"].struct_value.fields) for le in leases)
            got += leases
            rows = await conn.fetch(
                "SELECT id, status::text, attempts, lease_token FROM video_analysis_jobs "
                "WHERE id = ANY($1::uuid[])",
                ids,
            )
            held = {uuid.UUID(le.job.job_id) for le in got}
            for r in rows:
                if r["id"] in held:
                    assert (r["status"], r["attempts"]) == ("deep_running", 2)
                else:  # handed back before the answer: no lease, no attempt spent
                    assert (r["status"], r["lease_token"], r["attempts"]) == ("quick_done", None, 1)
        assert sorted(uuid.UUID(le.job.job_id) for le in got) == sorted(ids)
        assert replies >= 2
    finally:
        await conn.close()
