"""Tenants: fair shares by weight, a late tenant behind a 50,000 backlog,
work conservation, priorities and their aging bound, the lease guarantees under the fair claim,
quotas (each kind, raced across two instances, after a purge), and bad input.

Backlogs are bulk INSERTs through SQL (the revision 0011 trigger stamps their keys exactly as
it does for CompleteUpload); claims go through the real ClaimJob."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.support import auth
from tests.support.flows import claim, complete, error_reason, initiate, put_object
from tests.support.service import stubs_for

OWNER = auth.UPLOADER


def tenant(sub: str) -> str:
    return f"{OWNER}/{sub}"


async def bulk_queue(
    app: JobServiceApp, sub: str, n: int, priority: int = 0, *, keyed: bool = False
) -> None:
    """`n` queued jobs of sub-tenant `sub`, in one statement: one row trigger each, or with
    `keyed` (a 50,000 backlog) the keys the trigger would give a weight-1 tenant, numbered in
    SQL (one statement updating one tenant row 50,000 times is not what production does)."""
    async with app.engine.begin() as conn:
        await conn.execute(text("SET LOCAL statement_timeout = 0"))
        await conn.execute(
            text(
                "INSERT INTO video_sessions (id) VALUES ('00000000-0000-0000-0000-000000000001') "
                "ON CONFLICT DO NOTHING"
            )
        )
        await conn.execute(
            text(
                """
                INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename,
                    content_type, size_bytes, s3_bucket, s3_key, owner_subject, tenant, priority)
                SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 'queued',
                       'QUEUED', 'bulk.mp4', 'video/mp4', 1, 'b', 'k/' || g, :owner, :tenant, :p
                FROM generate_series(1, :n) AS g
                """
                if not keyed
                else """
                INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename,
                    content_type, size_bytes, s3_bucket, s3_key, owner_subject, tenant, priority,
                    fair_key, fair_rank, queued_at)
                SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 'queued',
                       'QUEUED', 'bulk.mp4', 'video/mp4', 1, 'b', 'k/' || g, :owner, :tenant, :p,
                       g, g, now()
                FROM generate_series(1, :n) AS g
                """
            ),
            {"owner": OWNER, "tenant": tenant(sub) if sub else OWNER, "n": n, "p": priority},
        )
        if keyed:
            await conn.execute(
                text("INSERT INTO job_tenants (name, owner_subject, last_key) VALUES (:t, :o, :n)"),
                {"t": tenant(sub), "o": OWNER, "n": n},
            )


async def set_tenant(api: Any, name: str, **fields: Any) -> pb.Tenant:
    resp = await api.admin.SetTenant(pb.SetTenantRequest(tenant=name, **fields), timeout=10)
    return resp.tenant


async def claim_n(api: Any, n: int, batch: int = 10) -> list[pb.Lease]:
    got: list[pb.Lease] = []
    while len(got) < n:
        leases = await claim(api, max_jobs=min(batch, n - len(got)))
        if not leases:
            break
        got += leases
    return got


async def queued_upload(api: Any, s3: Any, **fields: Any) -> pb.Job:
    init = await initiate(api, **fields)
    await put_object(s3, init.job.bucket, init.job.key)
    return await complete(api, init.job.job_id)


def subs(leases: list[pb.Lease]) -> list[str]:
    return [lease.job.tenant.split("/", 1)[-1] for lease in leases]


# -- fair shares -------------------------------------------------------------------------------


async def test_weights_give_proportional_shares(api, app):
    for sub, weight in (("a", 1), ("b", 2), ("c", 3)):
        await set_tenant(api, tenant(sub), weight=weight)
        await bulk_queue(app, sub, 600)
    shares = collections.Counter(subs(await claim_n(api, 300)))
    # 300 claims over weights 1:2:3 -> 50 / 100 / 150 (SFQ: off by at most one job each).
    assert abs(shares["a"] - 50) <= 2, shares
    assert abs(shares["b"] - 100) <= 2, shares
    assert abs(shares["c"] - 150) <= 2, shares


async def test_late_tenant_starts_within_one_round_behind_a_50k_backlog(api, app, moto_s3):
    started = time.monotonic()
    await bulk_queue(app, "backfill", 50_000, keyed=True)
    load_seconds = time.monotonic() - started
    assert len(await claim_n(api, 5)) == 5  # the backfill is being worked on
    late = [(await queued_upload(api, moto_s3, tenant="late")).job_id for _ in range(10)]
    # Two tenants of weight 1: a round is one job each. The late tenant's ten jobs all start
    # within its first ten rounds (21 claims: the head job, then alternating).
    first = await claim_n(api, 21, batch=1)
    assert {lease.job.job_id for lease in first} >= set(late), subs(first)
    assert collections.Counter(subs(first))["late"] == 10
    print(f"50,000 jobs bulk-queued in {load_seconds:.1f} s")


async def test_one_tenant_alone_gets_the_whole_fleet(api, app):
    await bulk_queue(app, "big", 40)
    await bulk_queue(app, "small", 4)
    answers = []
    while True:
        leases = await claim(api, max_jobs=8)
        if not leases:
            break
        answers.append(len(leases))
    # Work-conserving: every call is filled while anything is queued, whoever it belongs to.
    assert answers == [8, 8, 8, 8, 8, 4]


# -- priorities --------------------------------------------------------------------------------


async def test_higher_priority_first_then_oldest(api, app):
    await bulk_queue(app, "t", 5, priority=0)
    await bulk_queue(app, "t", 3, priority=5)  # a head start of 5 x 2 jobs: all 5 overtaken
    leases = await claim_n(api, 8, batch=1)
    assert [lease.job.priority for lease in leases[:3]] == [5, 5, 5]
    assert all(lease.job.priority == 0 for lease in leases[3:])
    async with app.engine.begin() as conn:
        keys = [
            (
                await conn.execute(
                    text("SELECT s3_key FROM video_analysis_jobs WHERE id = :i"),
                    {"i": lease.job.job_id},
                )
            ).scalar_one()
            for lease in leases
        ]
    # Oldest first within each priority (the bulk rows' keys are numbered in insert order).
    nums = [int(k.split("/")[1]) for k in keys]
    assert nums[:3] == [1, 2, 3] and nums[3:] == list(range(1, 6))


async def test_low_priority_is_overtaken_by_a_bounded_number_of_own_jobs(api, app):
    await bulk_queue(app, "t", 1, priority=0)
    await bulk_queue(app, "t", 200, priority=9)
    leases = await claim_n(api, 201)
    position = [lease.job.priority for lease in leases].index(0)
    # Aging rule: at most PRIORITY_STEP (2) x 9 steps = 18 of the tenant's later jobs go first.
    assert 0 < position <= 18, position


async def test_a_priority_never_takes_more_than_the_tenants_share(api, app):
    await bulk_queue(app, "plain", 100)
    await bulk_queue(app, "urgent", 100, priority=9)
    shares = collections.Counter(subs(await claim_n(api, 100)))
    # The head start is bounded (9 steps x 2 jobs, once per backlog); then the share is fair.
    assert 50 <= shares["urgent"] <= 50 + 18, shares
    more = collections.Counter(subs(await claim_n(api, 60)))
    assert abs(more["urgent"] - 30) <= 2, more


# -- the lease guarantees under the fair claim -------------------------------------------------


async def test_three_instances_24_workers_5_tenants_no_job_twice(api, app, settings):
    per = 40
    for i in range(5):
        await set_tenant(api, tenant(f"r{i}"), weight=i + 1)
        await bulk_queue(app, f"r{i}", per)
    async with JobServiceApp(settings) as two, JobServiceApp(settings) as three:
        async with (
            auth.channel(f"127.0.0.1:{two.port}") as c2,
            auth.channel(f"127.0.0.1:{three.port}") as c3,
        ):
            apis = [api, stubs_for(c2), stubs_for(c3)]

            async def worker(i: int) -> list[pb.Lease]:
                got: list[pb.Lease] = []
                while True:
                    leases = await claim(apis[i % 3], worker_id=f"w-{i}", max_jobs=2)
                    if not leases:
                        return got
                    got += leases

            results = await asyncio.gather(*(worker(i) for i in range(24)))
            leases = [lease for r in results for lease in r]
            # Fencing: each lease's own token renews it; a token of another job does not.
            a, b = leases[0], leases[1]
            beat = await apis[1].worker.Heartbeat(
                pb.HeartbeatRequest(
                    worker_id="w-x",
                    leases=[pb.LeaseRef(job_id=a.job.job_id, lease_token=a.lease_token)],
                ),
                timeout=10,
            )
            assert beat.leases[0].state == pb.LEASE_STATE_HELD
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await apis[2].worker.Heartbeat(
                    pb.HeartbeatRequest(
                        worker_id="w-x",
                        leases=[pb.LeaseRef(job_id=a.job.job_id, lease_token=b.lease_token)],
                    ),
                    timeout=10,
                )
            assert stale.value.code() == grpc.StatusCode.ABORTED
    ids = [lease.job.job_id for lease in leases]
    assert len(ids) == 5 * per and len(set(ids)) == len(ids), "a job went twice or was lost"
    assert len({lease.lease_token for lease in leases}) == len(leases)
    assert sum(1 for r in results if r) > 3, "the race did not happen"
    async with app.engine.begin() as conn:
        attempts = (
            (await conn.execute(text("SELECT DISTINCT attempts FROM video_analysis_jobs")))
            .scalars()
            .all()
        )
    assert attempts == [1]


# -- quotas ------------------------------------------------------------------------------------


def _quota_error(err: grpc.aio.AioRpcError) -> tuple[dict[str, str], float | None]:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert error_reason(err) == "TENANT_QUOTA_EXCEEDED"
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    meta: dict[str, str] = {}
    delay = None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            meta = dict(info.metadata)
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return meta, delay


async def test_live_jobs_quota_and_purge(api, app):
    await set_tenant(api, OWNER, max_live_jobs=3)
    jobs = [(await initiate(api, tenant=f"s{i}")).job.job_id for i in range(3)]  # sub-tenants count
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await initiate(api)
    meta, delay = _quota_error(exc.value)
    assert meta["quota"] == "live_jobs" and meta["used"] == "3" and meta["limit"] == "3"
    assert delay is None
    async with app.engine.begin() as conn:  # a job finishes, then is purged
        await conn.execute(
            text("UPDATE video_analysis_jobs SET status = 'failed' WHERE id = :i"), {"i": jobs[0]}
        )
    await initiate(api)
    async with app.engine.begin() as conn:
        await conn.execute(text("DELETE FROM video_analysis_jobs WHERE id = :i"), {"i": jobs[0]})
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await initiate(api)
    assert _quota_error(exc.value)[0]["used"] == "3"
    view = await set_tenant(api, OWNER)
    assert view.live_jobs == 3 and view.max_live_jobs == 3
    await set_tenant(api, OWNER, max_live_jobs=0)  # 0 removes the quota
    await initiate(api)


async def test_pending_bytes_quota(api):
    await set_tenant(api, OWNER, max_pending_bytes=2500)
    await initiate(api, size=1000)
    await initiate(api, size=1000)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await initiate(api, size=1000)
    meta, _ = _quota_error(exc.value)
    assert meta["quota"] == "pending_bytes" and meta["used"] == "2000"
    await initiate(api, size=500)


async def test_initiate_rate_quota_names_a_retry_delay(api):
    await set_tenant(api, OWNER, max_initiates_per_minute=2)
    await initiate(api)
    await initiate(api)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await initiate(api)
    meta, delay = _quota_error(exc.value)
    assert meta["quota"] == "initiates_per_minute" and meta["used"] == "2"
    assert delay is not None and 1 <= delay <= 60


async def test_quota_holds_under_concurrent_initiates_on_two_instances(api, app, settings):
    await set_tenant(api, OWNER, max_live_jobs=5)
    async with JobServiceApp(settings) as other:
        async with auth.channel(f"127.0.0.1:{other.port}") as ch:
            apis = [api, stubs_for(ch)]
            outcomes = await asyncio.gather(
                *(initiate(apis[i % 2]) for i in range(20)), return_exceptions=True
            )
    ok = [o for o in outcomes if isinstance(o, pb.InitiateUploadResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(ok) == 5 and len(refused) == 15, outcomes
    for err in refused:
        assert _quota_error(err)[0]["quota"] == "live_jobs"


# -- surfaces and bad input --------------------------------------------------------------------


async def test_list_tenants_shows_backlog_weight_and_dwell(api, app):
    await set_tenant(api, tenant("x"), weight=4)
    await bulk_queue(app, "x", 7)
    await claim_n(api, 2)
    listed = (await api.admin.ListTenants(pb.ListTenantsRequest(), timeout=10)).tenants
    x = next(t for t in listed if t.name == tenant("x"))
    assert (x.weight, x.queued, x.in_flight, x.owner) == (4, 5, 2, OWNER)
    assert x.HasField("dwell_p50") and x.HasField("dwell_p99")
    samples = app.metrics.registry.get_sample_value(
        "job_service_tenant_dwell_seconds_count", {"tenant": tenant("x")}
    )
    assert samples == 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"tenant": "a/b"}, "tenant"),
        ({"tenant": "bad\nname"}, "tenant"),
        ({"tenant": "x" * 65}, "tenant"),
    ],
)
async def test_bad_upload_fields_are_refused(api, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await initiate(api, **fields)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{field}:")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant": "t", "weight": 0}, "weight"),
        ({"tenant": "t", "weight": 1001}, "weight"),
        ({"tenant": "t", "max_live_jobs": -1}, "max_live_jobs"),
        ({"tenant": "t", "max_pending_bytes": -5}, "max_pending_bytes"),
        ({"tenant": "t", "max_initiates_per_minute": -1}, "max_initiates_per_minute"),
        ({"tenant": "bad\x07"}, "tenant"),
        ({"tenant": "x" * 321}, "tenant"),
    ],
)
async def test_bad_tenant_settings_are_refused(api, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await api.admin.SetTenant(pb.SetTenantRequest(**fields), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{field}:")
