"""The heartbeat path under a flood of WatchJob streams and parked ClaimJob calls: clients
that cost the service connections and database time must not cost a healthy worker its lease."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

import grpc
from google.protobuf import duration_pb2
from jobs.v1 import jobs_pb2 as pb

from tests.chaos.harness import Api, Figures, Fleet, JobsDb, Scale, until


async def test_watch_and_claim_floods_cost_no_lease(
    fleet: Fleet,
    database_url: str,
    jobs_db: JobsDb,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("heartbeats under WatchJob + ClaimJob floods")
    lease = 3.0
    flood_seconds = lease * chaos_scale.pick(3, 5)
    watchers = chaos_scale.pick(300, 600)
    # Half of the claimers park (wait 2 s), half ask again at once (wait 0): a hot loop of
    # claim queries, as a misconfigured fleet would send.
    claimers = chaos_scale.pick(200, 400)
    workers = 2
    deep = flood_seconds + 2 * lease
    fig.notes["flood"] = (
        f"{watchers} WatchJob streams + {claimers} ClaimJob loops (half parked, half hot) "
        f"for {flood_seconds:.0f} s"
    )

    service = await fleet.service(
        database_url=database_url,
        lease_seconds=lease,
        heartbeat_interval_seconds=lease / 3,
        retry_base_seconds=0.1,
        claim_max_wait_seconds=2,
    )
    await fleet.start_workers(workers, service.address, deep_seconds=deep)
    ids = await fleet.submit(fleet.api(service.address), workers)
    fig.submitted = len(ids)

    async def all_in_deep_pass() -> bool:
        return {s.job for s in fleet.spans() if s.kind == "deep"} == set(ids)

    await until(all_in_deep_pass, within=30, what="every job in its deep pass")

    answers: collections.Counter[str] = collections.Counter()
    stolen: list[str] = []
    stop_at = time.monotonic() + flood_seconds
    # The flood's own channels: many connections, as many clients would open.
    apis = [fleet.api(service.address) for _ in range(8)]

    async def watch(api: Api, job_id: str) -> None:
        while time.monotonic() < stop_at:
            # Streams of a second or two: each reconnect reads the job again.
            lifetime = min(stop_at - time.monotonic(), 1.0 + (hash(job_id) % 100) / 100)
            call = api.upload.WatchJob(
                pb.WatchJobRequest(job_id=job_id), timeout=max(0.1, lifetime)
            )
            try:
                async for _ in call:
                    answers["WatchJob update"] += 1
            except grpc.aio.AioRpcError as exc:
                answers[f"WatchJob {exc.code().name}"] += 1
                if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    await asyncio.sleep(0.2)  # a refused stream: the client backs off a little
            finally:
                call.cancel()

    async def claim(api: Api, n: int) -> None:
        while time.monotonic() < stop_at:
            request = pb.ClaimJobRequest(
                worker_id=f"flood-{n}",
                max_jobs=1,
                wait=duration_pb2.Duration(seconds=2 if n % 2 else 0),
            )
            try:
                response = await api.worker.ClaimJob(request, timeout=5)
                answers["ClaimJob answered"] += 1
                for got in response.leases:
                    # Only a lost lease makes a job claimable here; hand it straight back.
                    stolen.append(got.job.job_id)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await api.worker.ReleaseJob(
                            pb.ReleaseJobRequest(
                                job_id=got.job.job_id, lease_token=got.lease_token, reason="flood"
                            ),
                            timeout=5,
                        )
            except grpc.aio.AioRpcError as exc:
                answers[f"ClaimJob {exc.code().name}"] += 1
                await asyncio.sleep(0.2)  # the client backs off a little

    margins: list[float] = []

    async def sample_lease_margin() -> None:
        # How close the held leases came to expiring: the heartbeat path's slack under load.
        while time.monotonic() < stop_at:
            rows = await jobs_db.query(
                "SELECT extract(epoch FROM min(lease_expires_at) - now()) "
                "FROM video_analysis_jobs WHERE lease_token IS NOT NULL"
            )
            if rows and rows[0][0]:
                margins.append(float(rows[0][0]))
            await asyncio.sleep(0.25)  # sampling interval

    tasks = [
        sample_lease_margin(),
        *(watch(apis[n % len(apis)], ids[n % len(ids)]) for n in range(watchers)),
        *(claim(apis[n % len(apis)], n) for n in range(claimers)),
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=flood_seconds + 15)
    fig.notes["flood answers"] = dict(answers)
    fig.notes["jobs a flood claimer got (a lost lease)"] = len(stolen)
    fig.notes["least lease time left during the flood (s)"] = (
        round(min(margins), 2) if margins else None
    )

    try:
        await jobs_db.wait_all_terminal(len(ids), within=deep + 4 * lease + 20)
    finally:
        spans = fleet.spans()
        fig.take(await jobs_db.jobs(), await jobs_db.error_rows(), spans)
        fig.notes["worker 'heartbeat failed' lines"] = len(fleet.worker_events("heartbeat failed"))
        fig.notes["worker 'lease lost' lines"] = len(fleet.worker_events("heartbeat: lease lost"))
        fig.notes["deep passes"] = [(s.worker, s.outcome) for s in spans if s.kind == "deep"]

    assert "LEASE_EXPIRED" not in fig.error_rows, fig.render()
    assert not stolen, fig.render()
    assert set(fig.attempts) == {1}, fig.render()
    assert fig.statuses == {"done": len(ids)}, fig.render()
    assert [s.outcome for s in spans if s.kind == "deep"] == ["done"] * len(ids), fig.render()
