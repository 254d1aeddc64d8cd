"""The job-service losing its database: an outage of several lease lengths (connections
refused by a fault proxy), and a real Postgres restart with fast shutdown under load."""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from job_service.storage import migrate
from localinfra.postgres import PostgresCluster
from tests.chaos.harness import Figures, Fleet, Interval, JobsDb, Scale, until


def deep_passes(spans: list[Interval]) -> dict[str, list[str]]:
    """Job id -> outcomes of its deep passes, in order."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for span in spans:
        if span.kind == "deep":
            out[span.job].append(span.outcome)
    return dict(out)


async def test_database_outage_of_three_leases_takes_no_lease_from_healthy_workers(
    fleet: Fleet,
    jobs_db: JobsDb,
    pg: PostgresCluster,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("database outage (3+ leases) with running jobs")
    lease = chaos_scale.pick(3.0, 4.0)
    outage = lease * chaos_scale.pick(3.5, 4.0)
    workers = 2
    # Long enough that every job is mid-deep-pass when the outage begins and still has one
    # and a half leases of work left when it ends: the workers must renew after the outage.
    deep = outage + 1.5 * lease + 1
    fig.notes["lease s"] = lease
    fig.notes["outage s"] = outage

    db = await fleet.proxy(pg.port)
    service = await fleet.service(
        database_url=jobs_db.sa_url(db.port),
        lease_seconds=lease,
        heartbeat_interval_seconds=lease / 3,
        retry_base_seconds=0.1,
    )
    await fleet.start_workers(workers, service.address, deep_seconds=deep)
    api = fleet.api(service.address)
    ids = await fleet.submit(api, workers)
    fig.submitted = len(ids)

    async def all_in_deep_pass() -> bool:
        return {s.job for s in fleet.spans() if s.kind == "deep"} == set(ids)

    await until(all_in_deep_pass, within=30, what="every job in its deep pass")
    before = {j.id: j.attempts for j in await jobs_db.jobs()}

    db.set_mode("refuse")
    await asyncio.sleep(outage)  # the outage
    db.set_mode("pass")
    try:
        await jobs_db.wait_all_terminal(len(ids), within=deep + 4 * lease + 20)
    finally:
        spans = fleet.spans()
        fig.take(await jobs_db.jobs(), await jobs_db.error_rows(), spans)
        fig.notes["deep passes per job"] = deep_passes(spans)
        fig.notes["'lease expired' warnings"] = len(fleet.service_events("lease expired"))
        fig.notes["attempts before the outage"] = sorted(before.values())
        fig.notes["workers' self-fence lines"] = len(fleet.worker_events("lease not renewed"))

    after = {j.id: j.attempts for j in await jobs_db.jobs()}
    assert after == before, fig.render()  # the outage spent no attempt
    assert "LEASE_EXPIRED" not in fig.error_rows, fig.render()
    assert fig.statuses == {"done": len(ids)}, fig.render()
    # The work in progress survived: one deep pass per job, never aborted or restarted.
    assert all(outcomes == ["done"] for outcomes in deep_passes(spans).values()), fig.render()


@pytest.fixture
def restartable_pg() -> Iterator[JobsDb]:
    """A cluster of its own with a kept data directory, so stop() + start() is a restart with
    fast shutdown on the same port (the shared cluster deletes its data on stop)."""
    root = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
    cluster = PostgresCluster(root / "data")
    try:
        cluster.start()
        cluster.create_database("jobs")
        db = JobsDb(cluster, "jobs")
        migrate.upgrade(db.sa_url())
        yield db
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_restart_under_load_loses_and_fails_nothing(
    fleet: Fleet,
    restartable_pg: JobsDb,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("Postgres restart (fast shutdown) under load")
    jobs = chaos_scale.pick(6, 24)
    workers = 3
    restarts = chaos_scale.pick(1, 3)
    lease = 3.0
    db = restartable_pg

    service = await fleet.service(
        database_url=db.sa_url(),
        lease_seconds=lease,
        heartbeat_interval_seconds=lease / 3,
        retry_base_seconds=0.1,
    )
    await fleet.start_workers(workers, service.address, deep_seconds=1.5)
    api = fleet.api(service.address)
    ids = await fleet.submit(api, jobs)
    fig.submitted = len(ids)

    restart_seconds = []
    for n in range(restarts):
        # Spread the restarts over the run: after 1/(restarts+1), 2/(restarts+1)... of the jobs.
        target = len(ids) * (n + 1) // (restarts + 1)

        async def reached(target: int = target) -> bool:
            rows = await db.jobs_or_none()
            return rows is not None and sum(j.status == "done" for j in rows) >= target

        await until(reached, within=60, what=f"{target} jobs done before restart {n + 1}")
        started = time.monotonic()
        await asyncio.to_thread(db.cluster.stop)  # pg_ctl stop -m fast
        await asyncio.to_thread(db.cluster.start)
        restart_seconds.append(round(time.monotonic() - started, 1))
    fig.notes["restarts (s each)"] = restart_seconds
    try:
        await db.wait_all_terminal(len(ids), within=jobs / workers * 2.5 + 40)
    finally:
        fig.take(await db.jobs(), await db.error_rows(), fleet.spans())

    assert fig.statuses == {"done": len(ids)}, fig.render()
    assert fig.error_rows == {}, fig.render()  # not even a transient failure was recorded
