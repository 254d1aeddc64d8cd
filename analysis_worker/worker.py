"""The worker loop: claim what fits, keep every lease alive, stop cleanly.

Three concurrent parts on one event loop:
* the claim loop long-polls ClaimJob for exactly the number of free slots, and does not call it
  at all while every slot is busy;
* one heartbeat loop renews all held leases in a single Heartbeat call and turns the answers
  into stop decisions (LOST → drop, cancel_requested → CANCELLED). Rounds are scheduled from
  the last *successful* renewal (not "an interval after the last call returned"); a failed or
  slow round is retried quickly, each try's deadline fitted to the time the leases have left,
  so one lost or hung round never costs a lease. Each lease fences itself (lease_keeper.py) if no
  renewal lands before it runs out;
* one task per lease (`JobRunner.run`), whose analysis runs in a thread pool so the loop, and
  with it the heartbeats, never stalls behind a CPU-bound pass.

`shutdown()` (SIGTERM/SIGINT) stops claiming at once — an in-flight long-poll ClaimJob is
cancelled, and leases that arrive anyway are released (ReleaseJob) unstarted — gives running
jobs `shutdown_grace` seconds to finish, then aborts them: each releases its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from jobs.v1 import jobs_pb2

from analysis_worker.lease_keeper import ActiveJob, StopReason, lease_lifetime
from analysis_worker.metrics import WorkerMetrics
from analysis_worker.runner import JobRunner
from jobs_client.errors import DATABASE_UNAVAILABLE, JobsError
from jobs_client.retry import Backoff
from jobs_client.worker import WorkerClient

log = logging.getLogger(__name__)


# Between failed ClaimJob rounds; grows to 30 s during a long outage.
CLAIM_RETRY = Backoff(max_attempts=1, initial_backoff=1.0, max_backoff=30.0)
# Between a failed (or timed-out) heartbeat round and the next try. The next try also never
# waits past a quarter of the time the leases have left.
HEARTBEAT_RETRY = Backoff(max_attempts=1, initial_backoff=0.1, max_backoff=2.0)
# The shortest deadline a heartbeat round gets, however little time the leases have left.
MIN_HEARTBEAT_DEADLINE = 0.05


@dataclass(frozen=True)
class WorkerOptions:
    """The loop's knobs (main() derives them from Settings; tests set them directly)."""

    worker_id: str
    concurrency: int = 2
    claim_wait: float = 20.0
    shutdown_grace: float = 30.0
    # After the grace period: how long aborted jobs get to notice and release their lease
    # before the worker cancels them and releases the leases itself.
    abort_timeout: float = 10.0
    # Backoff between failed ClaimJob rounds (the client has already retried inside each).
    claim_retry: Backoff = CLAIM_RETRY
    # Between a failed heartbeat round and its retry (see HEARTBEAT_RETRY).
    heartbeat_retry: Backoff = HEARTBEAT_RETRY
    # When ClaimJob answers "nothing" faster than this (a service that does not long-poll, or
    # claim_wait 0), wait out the rest before asking again instead of spinning.
    min_empty_claim_interval: float = 1.0


class Worker:
    """Claims, runs and heartbeats leases until `shutdown()`; `run()` returns when done."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        client: WorkerClient,
        runner: JobRunner,
        metrics: WorkerMetrics,
    ) -> None:
        if options.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._options = options
        self._client = client
        self._runner = runner
        self._metrics = metrics
        self._jobs: dict[str, ActiveJob] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._job_added = asyncio.Event()
        self._background_tasks: set[asyncio.Task[None]] = set()
        self._rng = random.Random()
        self._log_extra = {"worker_id": options.worker_id}

    @property
    def active_job_ids(self) -> list[str]:
        return list(self._jobs)

    def shutdown(self) -> None:
        """Begins a graceful stop; safe to call any number of times, from a signal handler."""
        if not self._stopping.is_set():
            log.info("shutdown requested: no new claims", extra=self._log_extra)
            self._stopping.set()

    async def run(self) -> None:
        """Runs until `shutdown()` and the shutdown sequence complete."""
        log.info(
            "worker started",
            extra={**self._log_extra, "concurrency": self._options.concurrency},
        )
        claim = asyncio.create_task(self._claim_loop(), name="claim-loop")
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat-loop")
        try:
            await self._stopping.wait()
            # Stop claiming at once, even mid-long-poll: the claim loop cancels its in-flight
            # ClaimJob itself, so it can release any lease that arrived anyway.
            await asyncio.wait({claim}, timeout=self._client.rpc_timeout)
            await self._drain()
            await self._wait_background()
        finally:
            claim.cancel()
            heartbeat.cancel()
            for task in (claim, heartbeat):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        log.info("worker stopped", extra=self._log_extra)

    async def _wait_background(self) -> None:
        """Releases still in flight get one RPC timeout (plus retries' worth) to land."""
        if self._background_tasks:
            await asyncio.wait(set(self._background_tasks), timeout=2 * self._client.rpc_timeout)

    async def _drain(self) -> None:
        """Lets running jobs finish within the grace period, then aborts and releases them."""
        pending = set(self._tasks.values())
        if not pending:
            return
        log.info(
            "waiting for running jobs",
            extra={
                **self._log_extra,
                "jobs": len(pending),
                "grace_s": self._options.shutdown_grace,
            },
        )
        _, pending = await asyncio.wait(pending, timeout=self._options.shutdown_grace)
        if not pending:
            return
        log.warning(
            "grace period over: aborting running jobs",
            extra={**self._log_extra, "jobs": len(pending)},
        )
        for job in list(self._jobs.values()):
            job.stop(StopReason.SHUTDOWN)
        _, pending = await asyncio.wait(pending, timeout=self._options.abort_timeout)
        if not pending:
            return
        # Jobs that did not wind down (an analysis ignoring should_stop, or an unreachable
        # job-service): cancel them and release their leases ourselves, best effort.
        stuck = [job for job in self._jobs.values() if self._tasks[job.job_id] in pending]
        for task in pending:
            task.cancel()
        await asyncio.wait(pending)
        for job in stuck:
            if job.done or job.stop_reason is StopReason.LOST:
                continue
            try:
                await self._client.release(job.lease, reason="worker shutting down (forced)")
                self._metrics.jobs_released.inc()
                job.log.warning("lease released after forced abort")
            except JobsError as exc:
                job.log.error("could not release lease", extra={"error": str(exc)})

    # -- claiming ------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            free = self._options.concurrency - len(self._jobs)
            if free <= 0:
                await _first_of(self._slot_freed, self._stopping)
                self._slot_freed.clear()
                continue
            started = loop.time()
            try:
                leases = await self._client.claim(
                    free, self._options.claim_wait, stop=self._stopping
                )
            except JobsError as exc:
                # Unavailable or rejected: nothing is claimed, so nothing can be lost by
                # waiting. Back off and keep trying; the service may come back any time.
                failures += 1
                self._metrics.claim_calls.labels("error").inc()
                delay = self._options.claim_retry.delay(failures - 1, self._rng)
                level = logging.WARNING if exc.retryable else logging.ERROR
                log.log(
                    level,
                    "ClaimJob failed; backing off",
                    extra={**self._log_extra, "error": str(exc), "retry_in_s": round(delay, 2)},
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                continue
            failures = 0
            # A long poll's lease may have been granted at any moment of the wait, so the send
            # time says nothing about it: a claimed lease is counted from its answer's arrival
            # (the fence margin covers the answer's transit). Renewals count from their send.
            received_at, received_wall = loop.time(), time.time()
            self._metrics.claim_calls.labels("leased" if leases else "empty").inc()
            for index, lease in enumerate(leases):
                if self._stopping.is_set():
                    # The answer arrived as SIGTERM did: never start what we are about to
                    # abandon, release it at once (no attempt counted).
                    self._background(self._release_unstarted(lease, "worker shutting down"))
                elif index < free:
                    self._start(lease, counted_from=received_at, counted_from_wall=received_wall)
                else:
                    # The service gave more than asked: never hold what we cannot start.
                    self._background(self._release_unstarted(lease, "more leases than requested"))
            idle = self._options.min_empty_claim_interval - (loop.time() - started)
            if not leases and idle > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await self._stopping.wait()

    def _start(
        self, lease: jobs_pb2.Lease, *, counted_from: float, counted_from_wall: float
    ) -> None:
        job = ActiveJob(
            lease, self._options.worker_id, sent_at=counted_from, sent_wall=counted_from_wall
        )
        if lease.job.cancel_requested:
            job.stop(StopReason.CANCELLED)  # fail it as CANCELLED without starting
        self._jobs[job.job_id] = job
        self._metrics.leases_claimed.inc()
        self._metrics.active_jobs.set(len(self._jobs))
        task = asyncio.create_task(self._runner.run(job), name=f"job-{job.job_id}")
        self._tasks[job.job_id] = task
        task.add_done_callback(functools.partial(self._finished, job))
        self._job_added.set()

    def _finished(self, job: ActiveJob, task: asyncio.Task[None]) -> None:
        self._jobs.pop(job.job_id, None)
        self._tasks.pop(job.job_id, None)
        self._metrics.active_jobs.set(len(self._jobs))
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            job.log.error("job task crashed", exc_info=task.exception())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _release_unstarted(self, lease: jobs_pb2.Lease, reason: str) -> None:
        try:
            await self._client.release(lease, reason=reason)
        except JobsError as exc:
            # Its lease expires on its own; the job is claimable again after that.
            log.warning(
                "could not release a lease",
                extra={**self._log_extra, "job_id": lease.job.job_id, "error": str(exc)},
            )
            return
        self._metrics.jobs_released.inc()
        log.info(
            "lease released unstarted",
            extra={**self._log_extra, "job_id": lease.job.job_id, "reason": reason},
        )

    # -- heartbeats ----------------------------------------------------------------------------

    def _held(self) -> list[ActiveJob]:
        return [job for job in self._jobs.values() if not job.done and not job.lost.is_set()]

    async def _heartbeat_loop(self) -> None:
        """Renews every held lease in one Heartbeat call: O(1) calls per worker.

        A round is due one heartbeat interval after the last renewal that *succeeded* (sent
        time), for the lease due first; every held lease rides along. A failed or timed-out
        round is retried after a short jittered backoff, never waiting past a quarter of the
        time left before the first lease would fence itself.
        """
        loop = asyncio.get_running_loop()
        failures = 0
        retry_at = 0.0
        while True:
            held = self._held()
            if not held:
                failures = 0  # the next lease starts a schedule of its own
                self._job_added.clear()
                await self._job_added.wait()
                continue
            now = loop.time()
            if failures:
                due = retry_at
            else:
                due = min(job.renewed_at + job.heartbeat_interval for job in held)
            if due > now:
                # A lease claimed meanwhile may be due sooner: wake for it.
                self._job_added.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due - now):
                        await self._job_added.wait()
                continue
            if await self._heartbeat_once(held):
                failures = 0
                continue
            failures += 1
            now = loop.time()
            delay = self._options.heartbeat_retry.delay(failures - 1, self._rng)
            fence_at = self._first_fence(held)
            if fence_at is not None:
                delay = min(delay, max(0.0, (fence_at - now) / 4))
            retry_at = now + delay

    @staticmethod
    def _first_fence(jobs: list[ActiveJob]) -> float | None:
        fences = [job.fence_at for job in jobs if job.fence_at is not None]
        return min(fences) if fences else None

    async def _heartbeat_once(self, held: list[ActiveJob]) -> bool:
        """One round; True if the service answered."""
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        sent_wall = time.time()
        # Wait at most one interval, and at most half the time the first lease has left, so
        # a hung round leaves room for a retry before any lease runs out.
        deadline = min(job.heartbeat_interval for job in held)
        fence_at = self._first_fence(held)
        if fence_at is not None:
            deadline = min(deadline, (fence_at - sent_at) / 2)
        deadline = max(deadline, MIN_HEARTBEAT_DEADLINE)
        try:
            statuses = await self._client.heartbeat([job.ref() for job in held], deadline=deadline)
        except JobsError as exc:
            # Keep working: the retry comes soon, and if the lease really expired meanwhile
            # the next answer says LOST (or the lease fences itself first).
            self._metrics.heartbeats.labels("error").inc()
            if exc.reason == DATABASE_UNAVAILABLE:
                # The service is there and its database is not: no lease can be rescued
                # until one grace after the database is back (the service's outage grace),
                # so the fence moves with every such answer and the work goes on.
                for job in held:
                    job.held_through_outage(sent_at)
            log.warning(
                "heartbeat failed; retrying soon",
                extra={
                    **self._log_extra,
                    "error": str(exc),
                    "jobs": len(held),
                    "deadline_s": round(deadline, 3),
                },
            )
            return False
        self._metrics.heartbeats.labels("ok").inc()
        by_id = {status.job_id: status for status in statuses}
        for job in held:
            status = by_id.get(job.job_id)
            if status is None or job.done:
                # Finished while the call was in flight: "LOST" now just means "finished".
                continue
            if status.state == jobs_pb2.LEASE_STATE_LOST:
                if job.stop_reason is not StopReason.LOST:
                    job.log.warning("heartbeat: lease lost; stopping the job")
                job.stop(StopReason.LOST)
                continue
            job.renewed(
                sent_at,
                lease_lifetime(
                    status.lease_ttl if status.HasField("lease_ttl") else None,
                    status.lease_expires_at if status.HasField("lease_expires_at") else None,
                    sent_wall=sent_wall,
                ),
            )
            if status.cancel_requested and job.stop_reason is None:
                job.log.info("heartbeat: cancellation requested; stopping the job")
                job.stop(StopReason.CANCELLED)
        return True


async def _first_of(*events: asyncio.Event) -> None:
    """Waits until any of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
