"""The worker loop: claim what fits, keep every lease alive, stop cleanly.

Three concurrent parts on one event loop:
* the claim loop long-polls ClaimJob for exactly the number of free slots, and does not call it
  at all while every slot is busy;
* one heartbeat loop renews all held leases in a single Heartbeat call per interval and turns
  the answers into stop decisions (LOST → drop, cancel_requested → CANCELLED);
* one task per lease (`JobRunner.run`), whose analysis runs in a thread pool so the loop, and
  with it the heartbeats, never stalls behind a CPU-bound pass.

`shutdown()` (SIGTERM/SIGINT) stops claiming at once, gives running jobs `shutdown_grace`
seconds to finish, then aborts them: each hands its lease back with ReleaseJob.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from jobs.v1 import jobs_pb2

from analysis_worker.job_client import (
    JobClient,
    JobServiceError,
    JobServiceUnavailable,
    RetryPolicy,
)
from analysis_worker.lease import ActiveJob, StopReason
from analysis_worker.metrics import WorkerMetrics
from analysis_worker.runner import JobRunner

log = logging.getLogger(__name__)


# Between failed ClaimJob rounds; grows to 30 s during a long outage.
CLAIM_RETRY = RetryPolicy(max_attempts=1, initial_backoff=1.0, max_backoff=30.0)


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
    claim_retry: RetryPolicy = CLAIM_RETRY
    # When ClaimJob answers "nothing" faster than this (a service that does not long-poll, or
    # claim_wait 0), wait out the rest before asking again instead of spinning.
    min_empty_claim_interval: float = 1.0


class Worker:
    """Claims, runs and heartbeats leases until `shutdown()`; `run()` returns when done."""

    def __init__(
        self,
        options: WorkerOptions,
        *,
        client: JobClient,
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
            # Stop claiming at once, even mid-long-poll.
            claim.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await claim
            await self._drain()
        finally:
            claim.cancel()
            heartbeat.cancel()
            for task in (claim, heartbeat):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        log.info("worker stopped", extra=self._log_extra)

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
        # job-service): cancel them and hand their leases back ourselves, best effort.
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
            except JobServiceError as exc:
                job.log.error("could not release lease", extra={"error": str(exc)})

    # -- claiming ------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            free = self._options.concurrency - len(self._jobs)
            if free <= 0:
                await self._slot_freed.wait()
                self._slot_freed.clear()
                continue
            started = loop.time()
            try:
                leases = await self._client.claim(free, self._options.claim_wait)
            except JobServiceError as exc:
                # Unavailable or rejected: nothing is claimed, so nothing can be lost by
                # waiting. Back off and keep trying; the service may come back any time.
                failures += 1
                self._metrics.claim_calls.labels("error").inc()
                delay = self._options.claim_retry.delay(failures - 1, self._rng)
                level = logging.WARNING if isinstance(exc, JobServiceUnavailable) else logging.ERROR
                log.log(
                    level,
                    "ClaimJob failed; backing off",
                    extra={**self._log_extra, "error": str(exc), "retry_in_s": round(delay, 2)},
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                continue
            failures = 0
            self._metrics.claim_calls.labels("leased" if leases else "empty").inc()
            for index, lease in enumerate(leases):
                if index < free:
                    self._start(lease)
                else:
                    # The service gave more than asked: never hold what we cannot start.
                    self._background(self._hand_back(lease))
            idle = self._options.min_empty_claim_interval - (loop.time() - started)
            if not leases and idle > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=idle)

    def _start(self, lease: jobs_pb2.Lease) -> None:
        job = ActiveJob(lease, self._options.worker_id)
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

    async def _hand_back(self, lease: jobs_pb2.Lease) -> None:
        with contextlib.suppress(JobServiceError):
            await self._client.release(lease, reason="more leases than requested")

    # -- heartbeats ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """One Heartbeat call per interval for every held lease: O(1) calls per worker."""
        while True:
            if not self._jobs:
                self._job_added.clear()
                await self._job_added.wait()
                continue
            # The shortest interval any held lease asks for; a lease claimed mid-wait is
            # renewed early, never late.
            interval = min(job.heartbeat_interval for job in self._jobs.values())
            await asyncio.sleep(interval)
            await self._heartbeat_once(interval)

    async def _heartbeat_once(self, interval: float) -> None:
        held = [job for job in self._jobs.values() if not job.done and not job.lost.is_set()]
        if not held:
            return
        try:
            statuses = await self._client.heartbeat([job.ref() for job in held], deadline=interval)
        except JobServiceError as exc:
            # Keep working: if the lease really expired meanwhile, the next answer says LOST.
            self._metrics.heartbeats.labels("error").inc()
            log.warning(
                "heartbeat failed", extra={**self._log_extra, "error": str(exc), "jobs": len(held)}
            )
            return
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
            elif status.cancel_requested and job.stop_reason is None:
                job.log.info("heartbeat: cancellation requested; stopping the job")
                job.stop(StopReason.CANCELLED)
