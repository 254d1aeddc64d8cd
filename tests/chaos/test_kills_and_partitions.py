"""Processes dying (SIGKILL storm over services and workers) and a worker cut off from the
job-service for longer than its lease (a partition, both directions frozen)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable

from tests.chaos.harness import Figures, Fleet, Interval, JobsDb, Scale, until
from tests.chaos.processes import ServiceProcess


def quick_redone_after_deep(spans: list[Interval]) -> list[str]:
    """Jobs whose quick pass ran again after a deep pass had begun. A deep pass begins only
    after the worker recorded QUICK_DONE, so a later quick pass is a resume at the wrong stage."""
    first_deep: dict[str, float] = {}
    for span in spans:
        if span.kind == "deep":
            first_deep[span.job] = min(first_deep.get(span.job, span.start), span.start)
    return sorted(
        {s.job for s in spans if s.kind == "quick" and s.start > first_deep.get(s.job, 1e18)}
    )


async def test_sigkill_storm_over_services_and_workers_loses_no_job(
    fleet: Fleet,
    database_url: str,
    jobs_db: JobsDb,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("SIGKILL storm (2 job-services, workers killed and restarted)")
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    jobs = chaos_scale.pick(6, 24)
    workers = chaos_scale.pick(3, 4)
    kills = chaos_scale.pick(3, 12)
    between_kills = chaos_scale.pick(2.0, 1.5)
    deep = chaos_scale.pick(2.5, 3.0)
    lease = 3.0
    fig.notes["seed (CHAOS_SEED)"] = seed

    settings = {
        "lease_seconds": lease,
        "heartbeat_interval_seconds": lease / 3,
        "retry_base_seconds": 0.1,
        # The storm kills at most `kills` workers: an attempt budget above that means no job
        # can fail for running out of attempts, only for a bug.
        "max_attempts": kills + 2,
    }
    first = await fleet.service(database_url=database_url, **settings)
    second = await fleet.service(database_url=database_url, **settings)
    # Workers reach the services through one balancing proxy, as through a load balancer:
    # when a service dies, its connections drop and reconnect to the other one.
    balancer = await fleet.proxy(
        int(first.address.rpartition(":")[2]), more_ports=[int(second.address.rpartition(":")[2])]
    )
    live = await fleet.start_workers(workers, balancer.address, quick_seconds=0.5, deep_seconds=2.5)
    ids = await fleet.submit(fleet.api(second.address), jobs)
    fig.submitted = len(ids)

    killed_workers = killed_mid_pass = 0
    # Replacements start in the background: the storm does not pause while one boots.
    starting: list[asyncio.Task[ServiceProcess]] = []

    def settle() -> None:
        for task in [t for t in starting if t.done()]:
            starting.remove(task)
            live.append(task.result())

    started = time.monotonic()
    for n in range(kills):
        await asyncio.sleep(between_kills * rng.uniform(0.5, 1.5))  # time between kills
        rows = await jobs_db.jobs()
        if all(j.status in ("done", "failed") for j in rows):
            break
        if n == 1:  # early, so the storm always includes it
            await asyncio.to_thread(fleet.kill, first)
            fig.notes["job-service killed after s"] = round(time.monotonic() - started, 1)
        settle()
        if not live:
            continue
        running = [s for s in fleet.spans() if s.outcome == "running"]
        busy = {s.pid for s in running}
        in_deep = {s.pid for s in running if s.kind == "deep"}
        # Mid-deep-pass first: that is the kill whose resume the scenario checks.
        candidates = (
            [w for w in live if w.proc.pid in in_deep]
            or [w for w in live if w.proc.pid in busy]
            or live
        )
        victim = rng.choice(candidates)
        killed_workers += 1
        killed_mid_pass += victim.proc.pid in busy
        await asyncio.to_thread(fleet.kill, victim)
        live.remove(victim)
        starting.append(
            asyncio.create_task(
                fleet.worker(balancer.address, quick_seconds=0.5, deep_seconds=deep)
            )
        )
    await asyncio.gather(*starting)
    settle()
    fig.notes["workers killed (mid-pass)"] = f"{killed_workers} ({killed_mid_pass})"

    try:
        await jobs_db.wait_all_terminal(len(ids), within=jobs / workers * 3.5 + 4 * lease + 30)
    finally:
        spans = fleet.spans()
        fig.take(await jobs_db.jobs(), await jobs_db.error_rows(), spans)
        redone = quick_redone_after_deep(spans)
        resumed = {s.job for s in spans if s.kind == "deep" and s.outcome == "killed"}
        fig.notes["jobs whose deep pass was killed"] = len(resumed)
        fig.notes["jobs whose quick pass was redone after reaching deep"] = len(redone)

    assert first.proc.returncode == -9, "the storm ended before it killed a job-service"
    assert fig.statuses == {"done": len(ids)}, fig.render()
    assert resumed, "the storm never hit a deep pass: nothing to resume"
    assert redone == [], fig.render()
    assert not fig.overlapping_jobs, fig.render()


async def test_partition_longer_than_a_lease_never_runs_a_job_twice_at_once(
    fleet: Fleet,
    database_url: str,
    jobs_db: JobsDb,
    chaos_scale: Scale,
    figures: Callable[[str], Figures],
) -> None:
    fig = figures("partition worker <-> job-service, longer than a lease")
    lease = chaos_scale.pick(3.0, 4.0)
    partition = lease * chaos_scale.pick(2.5, 3.5)
    # The partitioned worker would still be analysing well after another worker took over.
    deep = partition + 3 * lease
    fig.notes["lease s"] = lease
    fig.notes["partition s"] = partition

    service = await fleet.service(
        database_url=database_url,
        lease_seconds=lease,
        heartbeat_interval_seconds=lease / 3,
        retry_base_seconds=0.1,
    )
    port = int(service.address.rpartition(":")[2])
    cut = await fleet.proxy(port)
    healthy = await fleet.proxy(port)
    partitioned = await fleet.worker(cut.address, deep_seconds=deep)
    [job_id] = await fleet.submit(fleet.api(service.address), 1)
    fig.submitted = 1

    async def partitioned_worker_in_deep_pass() -> bool:
        return any(s.kind == "deep" and s.pid == partitioned.proc.pid for s in fleet.spans())

    await until(partitioned_worker_in_deep_pass, within=30, what="the first worker in deep")
    # The second worker resumes at the deep pass; its own pass can be short.
    await fleet.worker(healthy.address, deep_seconds=lease)
    cut.set_mode("partition")
    await asyncio.sleep(partition)  # the partition
    cut.set_mode("pass")
    try:
        await jobs_db.wait_all_terminal(1, within=2 * deep + 4 * lease + 20)
    finally:
        spans = fleet.spans()
        fig.take(await jobs_db.jobs(), await jobs_db.error_rows(), spans)
        completions = [e for e in fleet.worker_events("job completed") if e.get("job_id") == job_id]
        fig.notes["analyses (worker, pass, outcome, s)"] = [
            (s.worker, s.kind, s.outcome, round(s.end - s.start, 1)) for s in spans
        ]
        fig.notes["completions accepted"] = len(completions)
        fig.notes["workers' self-fence lines"] = len(fleet.worker_events("lease not renewed"))

    assert fig.statuses == {"done": 1}, fig.render()
    assert not fig.overlapping_jobs, fig.render()  # at most one analysis at any moment
    assert len(completions) == 1, fig.render()  # done once
