"""One lease the worker holds, and why (if at all) its job must stop.

The heartbeat loop, the shutdown sequence and the analysis thread all look at the same job, so
the stop decision lives in one object: the event loop sets a reason; the analysis thread polls
`should_stop()` (a threading.Event, safe to read from any thread); coroutines wait on asyncio
events to wake early from a download or a retry backoff.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading

from jobs.v1 import jobs_pb2

from analysis_worker.logs import JobLog

log = logging.getLogger("analysis_worker.job")

# Used when a lease comes without a heartbeat interval (the contract always sets one).
DEFAULT_HEARTBEAT_INTERVAL = 10.0


class StopReason(enum.IntEnum):
    """Why a job stops early. A higher value wins: once LOST, nothing may be sent for the job;
    a cancelled job is failed (CANCELLED) rather than released, even during shutdown."""

    SHUTDOWN = 1
    CANCELLED = 2
    LOST = 3


class JobStopped(Exception):
    """Raised inside the pipeline when the job's stop reason forbids going on."""


class ActiveJob:
    """A held lease: what to heartbeat, and the stop flag shared with the analysis thread."""

    def __init__(self, lease: jobs_pb2.Lease, worker_id: str) -> None:
        self.lease = lease
        self.log = JobLog(
            log, job_id=lease.job.job_id, worker_id=worker_id, attempt=lease.attempt
        )
        self.stop_reason: StopReason | None = None
        # Set once the job reached its outcome (completed, failed or released).
        self.done = False
        self._stop_flag = threading.Event()
        self.stopped = asyncio.Event()
        self.lost = asyncio.Event()

    @property
    def job_id(self) -> str:
        return self.lease.job.job_id

    @property
    def heartbeat_interval(self) -> float:
        interval = self.lease.heartbeat_interval.ToTimedelta().total_seconds()
        return interval if interval > 0 else DEFAULT_HEARTBEAT_INTERVAL

    def ref(self) -> jobs_pb2.LeaseRef:
        return jobs_pb2.LeaseRef(job_id=self.job_id, lease_token=self.lease.lease_token)

    def stop(self, reason: StopReason) -> None:
        """Asks the job to stop; a stronger reason replaces a weaker one. Event loop only."""
        if self.done:
            return
        if self.stop_reason is not None and self.stop_reason >= reason:
            return
        self.stop_reason = reason
        self._stop_flag.set()
        self.stopped.set()
        if reason is StopReason.LOST:
            self.lost.set()

    def should_stop(self) -> bool:
        """The analyzer's `should_stop` callback; called from the analysis thread."""
        return self._stop_flag.is_set()

    def raise_if_stopped(self, *, finishing: bool = False) -> None:
        """Raises JobStopped if the job must not go on.

        `finishing`: the analysis is done and only upload + CompleteJob are left; a shutdown
        does not interrupt that (finishing beats handing the work back), a loss or a
        cancellation does.
        """
        reason = self.stop_reason
        if reason is None or (finishing and reason is StopReason.SHUTDOWN):
            return
        raise JobStopped(reason.name)
