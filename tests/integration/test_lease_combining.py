"""Heartbeats, single progress reports and single completions that arrive together share one
statement per kind (storage/combiner.py), through a real service on a real Postgres, and
fencing stays exact: stale and live tokens of one job sent at once, often in one statement,
each answered as if alone; a completion racing a stale completion of the same job finishes
the job once."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import grpc
from google.protobuf import struct_pb2
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from tests.bench import sql
from tests.support.flows import claim
from tests.support.service import Stubs


def dsn_of(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


def ref(lease: pb.Lease) -> dict[str, str]:
    return {"job_id": lease.job.job_id, "lease_token": lease.lease_token}


async def live_and_stale(api: Stubs, database_url: str) -> tuple[set, set]:
    """24 held leases (live) and stale tokens of 12 of those jobs: 8 first leases released and
    leased again, and 4 tokens that never existed."""
    await sql.seed(dsn_of(database_url), 24)
    held = await claim(api, worker_id="w-a", max_jobs=12)
    first = await claim(api, worker_id="w-b", max_jobs=8)
    for lease in first:
        await api.worker.ReleaseJob(pb.ReleaseJobRequest(**ref(lease)), timeout=10)
    second = await claim(api, worker_id="w-b", max_jobs=12)
    live = {(le.job.job_id, le.lease_token) for le in held + second}
    stale = {(le.job.job_id, le.lease_token) for le in first} | {
        (le.job.job_id, str(uuid.uuid4())) for le in held[:4]
    }
    assert len(live) == 24 and not live & stale
    assert {j for j, _ in stale} & {j for j, _ in live}  # same job, two tokens
    return live, stale


async def test_combined_heartbeats_keep_exact_fencing_under_a_race(
    app: JobServiceApp, api: Stubs, database_url: str
) -> None:
    live, stale = await live_and_stale(api, database_url)
    renewals = app.leases._store.renewals  # type: ignore[attr-defined]
    before = renewals.statements, renewals.calls
    rng = random.Random(18)
    refs = sorted(live | stale)

    async def beat(i: int) -> dict[tuple[str, str], int]:
        mine = rng.sample(refs, 6)
        try:
            resp = await api.worker.Heartbeat(
                pb.HeartbeatRequest(
                    worker_id=f"w-{i}",
                    leases=[pb.LeaseRef(job_id=j, lease_token=t) for j, t in mine],
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as err:  # ABORTED LEASE_LOST: every lease asked is lost
            assert err.code() == grpc.StatusCode.ABORTED, err
            return dict.fromkeys(mine, pb.LEASE_STATE_LOST)
        return {r: st.state for r, st in zip(mine, resp.leases, strict=True)}

    answers = await asyncio.gather(*(beat(i) for i in range(60)))
    for answer in answers:
        for r, state in answer.items():
            assert state == (pb.LEASE_STATE_HELD if r in live else pb.LEASE_STATE_LOST), (r, state)
    statements = renewals.statements - before[0]
    calls = renewals.calls - before[1]
    assert calls == 60
    assert statements < calls, "heartbeats that arrived together were not combined"
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        rows = await conn.fetch(
            "SELECT id::text, lease_token::text FROM video_analysis_jobs "
            "WHERE lease_token IS NOT NULL AND lease_expires_at > now()"
        )
    finally:
        await conn.close()
    assert {(r["id"], r["lease_token"]) for r in rows} == live


async def test_combined_reports_and_completions_answer_each_call_as_alone(
    app: JobServiceApp, api: Stubs, database_url: str
) -> None:
    live, stale = await live_and_stale(api, database_url)
    store = app.leases._store  # type: ignore[attr-defined]
    before = store.advances.statements, store.completions.statements

    quick = struct_pb2.Struct()
    quick.update({"quick": {"width": 160}})

    async def report(job_id: str, token: str) -> grpc.StatusCode:
        try:
            await api.worker.ReportProgress(
                pb.ReportProgressRequest(
                    job_id=job_id,
                    lease_token=token,
                    status=pb.JOB_STATUS_DEEP_RUNNING,
                    progress_pct=40,
                    result=quick,
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    pairs = sorted(live | stale)
    codes = await asyncio.gather(*(report(j, t) for j, t in pairs))
    for (j, t), code in zip(pairs, codes, strict=True):
        want = grpc.StatusCode.OK if (j, t) in live else grpc.StatusCode.ABORTED
        assert code == want, (j, t, code)

    async def complete(job_id: str, token: str) -> grpc.StatusCode:
        try:
            resp = await api.worker.CompleteJob(
                pb.CompleteJobRequest(job_id=job_id, lease_token=token), timeout=30
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        assert resp.job.status == pb.JOB_STATUS_DONE
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(complete(j, t) for j, t in pairs))
    for (j, t), code in zip(pairs, codes, strict=True):
        want = grpc.StatusCode.OK if (j, t) in live else grpc.StatusCode.ABORTED
        assert code == want, (j, t, code)
    assert store.advances.statements - before[0] < len(pairs)
    assert store.completions.statements - before[1] < len(pairs)
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        done = await conn.fetch(
            "SELECT id::text, attempts FROM video_analysis_jobs WHERE status = 'done'"
        )
    finally:
        await conn.close()
    assert {r["id"] for r in done} == {j for j, _ in live}
