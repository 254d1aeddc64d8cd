"""S3 outages, seen by the workers and by the job-service.

Backoff scale: today's job retry chain is 2+4+8+16 s (base 2 s, doubling; ~30 s, jitter makes
it 15-30 s). These scenarios multiply every backoff setting by one `factor`: the job retry base
2 s and cap 300 s, the infrastructure backoff base 1 s and cap 30 s, and the worker's in-lease
S3 retry budget 60 s. The outage is longer than five of the scaled chains, so it outlasts the
retry budget exactly as a 2.5-minute outage outlasts the defaults. botocore's own retries
inside one S3 call keep their defaults.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import grpc

from localinfra.s3 import MotoS3
from tests.chaos.harness import Figures, Fleet, JobsDb, Scale, until
from tests.support import flows

DEFAULT_RETRY_BASE = 2.0
DEFAULT_RETRY_MAX = 300.0
DEFAULT_INFRA_RETRY_MAX = 30.0
#: How long one lease retries S3 trouble before it hands the job back (worker default).
DEFAULT_WORKER_S3_BUDGET = 60.0


def scaled_backoff(factor: float) -> dict[str, Any]:
    return {
        "retry_base_seconds": DEFAULT_RETRY_BASE * factor,
        "retry_max_seconds": DEFAULT_RETRY_MAX * factor,
        "infra_retry_base_seconds": 1.0 * factor,
        "infra_retry_max_seconds": DEFAULT_INFRA_RETRY_MAX * factor,
    }


def chain_seconds(factor: float) -> float:
    """Today's full backoff chain (four retries before the fifth and last attempt), scaled."""
    return float(sum(DEFAULT_RETRY_BASE * factor * 2**n for n in range(4)))


async def test_s3_outage_for_the_workers_fails_no_job(
    fleet: Fleet,
    database_url: str,
    jobs_db: JobsDb,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("S3 outage for the workers (503, then refused)")
    factor = chaos_scale.pick(0.05, 0.2)
    # As the issue measured it (two workers, six jobs); the short run has one job per worker,
    # so each job meets as many failed downloads as the short outage allows.
    jobs = chaos_scale.pick(2, 6)
    workers = 2
    # Longer than five scaled chains; the full run's is the issue's own 60 s.
    outage = max(5 * chain_seconds(factor) + 2.5, chaos_scale.pick(0.0, 60.0))
    lease = chaos_scale.pick(3.0, 4.0)
    # After S3 returns: one scaled infrastructure backoff cap, a lease, the queue's analysis
    # time, and slack for a loaded 2-core machine.
    analysis = 0.2 + 1.0
    bound = (
        DEFAULT_INFRA_RETRY_MAX * factor
        + lease
        + jobs / workers * analysis
        + chaos_scale.pick(15, 20)
    )
    fig.notes["backoff factor"] = f"{factor} (chain {chain_seconds(factor):.1f} s)"
    fig.notes["outage s"] = round(outage, 1)

    s3 = await fleet.proxy(fleet.s3.port)
    service = await fleet.service(
        database_url=database_url,
        lease_seconds=lease,
        heartbeat_interval_seconds=lease / 3,
        **scaled_backoff(factor),
    )
    await fleet.start_workers(
        workers,
        service.address,
        s3_endpoint=s3.url,
        deep_seconds=1.0,
        s3_retry_budget_seconds=DEFAULT_WORKER_S3_BUDGET * factor,
    )
    api = fleet.api(service.address)

    s3.set_mode("http503")
    ids = await fleet.submit(api, jobs)
    fig.submitted = len(ids)
    await asyncio.sleep(outage / 2)  # the outage itself: 503 SlowDown for the first half
    s3.set_mode("refuse")
    await asyncio.sleep(outage / 2)  # ...then connections refused
    during = collections.Counter(j.status for j in await jobs_db.jobs())
    fig.notes["statuses when S3 returned"] = dict(during)
    fig.notes["S3 connections during the outage"] = s3.accepted
    s3.set_mode("pass")
    back = time.monotonic()
    try:
        await jobs_db.wait_all_terminal(len(ids), within=bound)
    finally:
        fig.notes["s after S3 returned until all finished"] = round(time.monotonic() - back, 1)
        fig.notes["bound s"] = round(bound, 1)
        fig.take(await jobs_db.jobs(), await jobs_db.error_rows(), fleet.spans())

    assert fig.statuses.get("failed", 0) == 0, fig.render()
    assert fig.statuses.get("done", 0) == len(ids), fig.render()
    # Infrastructure trouble spends no attempt: every job was done on its first one.
    assert set(fig.attempts) == {1}, fig.render()
    assert not fig.overlapping_jobs, fig.render()


async def test_s3_outage_for_the_job_service_leaves_uploads_untouched(
    fleet: Fleet,
    database_url: str,
    jobs_db: JobsDb,
    moto_s3: MotoS3,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("S3 outage for the job-service (CompleteUpload + reconciler)")
    jobs = chaos_scale.pick(6, 20)
    outage = chaos_scale.pick(6.0, 20.0)
    reconcile_interval = 0.5
    fig.notes["outage s"] = outage

    s3 = await fleet.proxy(moto_s3.port)
    service = await fleet.service(
        database_url=database_url,
        s3_endpoint=s3.url,
        reconcile_after_seconds=1,
        reconcile_interval_seconds=reconcile_interval,
        # The upload URLs expire during the outage: the reconciler must still not give up on
        # objects it could not look at.
        upload_url_ttl_seconds=max(2, int(outage / 3)),
    )
    api = fleet.api(service.address)
    uploads = [await flows.initiate(api) for _ in range(jobs)]
    ids = [init.job.job_id for init in uploads]
    fig.submitted = len(ids)
    # The outage begins before any object exists, so the reconciler cannot have queued a job
    # before it; the clients' PUTs go to S3 directly, only the service's S3 traffic is cut.
    s3.set_mode("http503")
    for init in uploads:
        await flows.put_object(moto_s3, init.job.bucket, init.job.key)
    by_client = ids[: jobs // 2]  # the client retries these; the reconciler finds the rest

    answers: collections.Counter[str] = collections.Counter()

    async def complete_one(job_id: str) -> bool:
        try:
            await flows.complete(api, job_id)
        except grpc.aio.AioRpcError as exc:
            answers[exc.code().name] += 1
            return False
        answers["OK"] += 1
        return True

    async def complete_all(job_ids: list[str]) -> list[str]:
        """CompleteUpload for every job at once, as many clients would; the ones that landed."""
        landed = await asyncio.gather(*(complete_one(job_id) for job_id in job_ids))
        return [job_id for job_id, ok in zip(job_ids, landed, strict=True) if ok]

    await complete_all(by_client)
    await asyncio.sleep(outage / 2)  # the reconciler runs every 0.5 s meanwhile
    s3.set_mode("refuse")
    await complete_all(by_client)
    await asyncio.sleep(outage / 2)
    during = await jobs_db.jobs()
    rows_during = await jobs_db.error_rows()
    fig.notes["CompleteUpload answers during the outage"] = dict(answers)
    fig.notes["statuses at the end of the outage"] = dict(
        collections.Counter(j.status for j in during)
    )
    fig.notes["error rows during the outage"] = len(rows_during)
    fig.notes["reconciler S3 warnings"] = sum(
        1 for s in fleet.services for line in s.log().splitlines() if "upload reconcile" in line
    )

    s3.set_mode("pass")
    back = time.monotonic()
    retried = await complete_all(by_client)

    async def all_queued() -> bool:
        return all(j.status == "queued" for j in await jobs_db.jobs())

    try:
        await until(all_queued, within=chaos_scale.pick(15, 30), what="every job queued")
    except AssertionError:
        pass  # the figures below say which are not
    finally:
        fig.notes["s after S3 returned until all queued"] = round(time.monotonic() - back, 1)
        fig.notes["CompleteUpload retries that landed"] = len(retried)
        fig.take(await jobs_db.jobs(), await jobs_db.error_rows())

    assert all(j.status == "awaiting_upload" and not j.error_code for j in during), [
        (j.status, j.error_code) for j in during
    ]
    assert set(answers) - {"OK"} <= {"UNAVAILABLE"}, answers
    assert answers.get("OK", 0) == len(by_client), fig.render()  # the retries after S3 returned
    assert fig.statuses == {"queued": len(ids)}, fig.render()
