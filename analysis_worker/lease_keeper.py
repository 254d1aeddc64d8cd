"""One lease the worker holds, and why (if at all) its job must stop.

The heartbeat loop, the shutdown sequence and the analysis thread all look at the same job, so
the stop decision lives in one object: the event loop sets a reason; the analysis thread polls
`should_stop()` (a threading.Event, safe to read from any thread); coroutines wait on asyncio
events to wake early from a download or a retry backoff.

Self-fencing: the worker counts each lease's lifetime on its own monotonic clock, from the moment
it SENT the renewal that extended it (the service can only have renewed it later, so the worker's
deadline is never after the service's). A claim is a long poll whose lease may be granted at any
moment of the wait, so a claimed lease counts from when the answer arrived; the fence margin
covers the answer's transit. If no renewal lands in time, the job stops as if the lease were
lost: the analysis is aborted, nothing more is uploaded and nothing more is sent for it. A
worker cut off from the job-service therefore stops before the service can give the job to
anyone else, so at most one worker runs a job at any moment.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time

from google.protobuf import duration_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2

from analysis_worker.logs import JobLog

log = logging.getLogger("analysis_worker.job")

# Used when a lease comes without a heartbeat interval (the contract always sets one).
DEFAULT_HEARTBEAT_INTERVAL = 10.0
# The worker stops this much before its own count of the lease runs out (a tenth of the lease,
# at most one second): stopping an analysis thread or an upload is not instantaneous.
FENCE_MARGIN_FRACTION = 0.1
MAX_FENCE_MARGIN = 1.0


def lease_lifetime(
    ttl: duration_pb2.Duration | None,
    expires_at: timestamp_pb2.Timestamp | None,
    *,
    sent_wall: float,
) -> float | None:
    """Seconds a claim or renewal lasts, counted from when it was sent; None if unknown.

    `lease_ttl` (relative, immune to clock skew) when the service sends it; otherwise
    `lease_expires_at` against the local wall clock at the moment the call was sent.
    """
    if ttl is not None:
        seconds = ttl.ToTimedelta().total_seconds()
        if seconds > 0:
            return seconds
    if expires_at is not None and (expires_at.seconds or expires_at.nanos):
        seconds = expires_at.ToNanoseconds() / 1e9 - sent_wall
        # Already over by our clock: the clocks disagree by more than a lease. Fencing on that
        # would stop every job at once; without lease_ttl there is no honest count to fence on.
        return seconds if seconds > 0 else None
    return None


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

    def __init__(
        self,
        lease: jobs_pb2.Lease,
        worker_id: str,
        *,
        sent_at: float | None = None,
        sent_wall: float | None = None,
    ) -> None:
        """`sent_at` (event-loop clock) and `sent_wall` (time.time()): where the lease's count
        starts — for a claimed lease, when the ClaimJob answer arrived (see the module doc)."""
        self.lease = lease
        self.log = JobLog(log, job_id=lease.job.job_id, worker_id=worker_id, attempt=lease.attempt)
        self.stop_reason: StopReason | None = None
        # Set once the job reached its outcome (completed, failed or released).
        self.done = False
        # Set when the worker stopped the job itself because its lease ran out unrenewed.
        self.fenced = False
        # Seconds this lease has spent retrying S3 (its infrastructure retry budget).
        self.s3_trouble_seconds = 0.0
        self._stop_flag = threading.Event()
        self.stopped = asyncio.Event()
        self.lost = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        # When the last successful claim/renewal was sent: heartbeats are scheduled from here.
        self.renewed_at = now if sent_at is None else sent_at
        # Event-loop time at which the worker stops the job unless renewed (None: unknown).
        self.fence_at: float | None = None
        self._fence_handle: asyncio.TimerHandle | None = None
        # The last known length of this lease (seconds from a claim/renewal); None: unknown.
        self.lifetime: float | None = None
        lifetime = lease_lifetime(
            lease.lease_ttl if lease.HasField("lease_ttl") else None,
            lease.lease_expires_at if lease.HasField("lease_expires_at") else None,
            sent_wall=time.time() if sent_wall is None else sent_wall,
        )
        self.renewed(self.renewed_at, lifetime)

    @property
    def job_id(self) -> str:
        return self.lease.job.job_id

    @property
    def heartbeat_interval(self) -> float:
        interval = self.lease.heartbeat_interval.ToTimedelta().total_seconds()
        return interval if interval > 0 else DEFAULT_HEARTBEAT_INTERVAL

    def renewed(self, sent_at: float, lifetime: float | None) -> None:
        """A claim/renewal sent at `sent_at` (loop clock) succeeded and lasts `lifetime` s."""
        self.renewed_at = max(self.renewed_at, sent_at)
        if lifetime is not None:
            self.lifetime = lifetime
        self._extend_fence(sent_at, lifetime)

    def held_through_outage(self, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` was answered "the service's database is unavailable".

        Nobody can rescue the lease while the database is down, and the service rescues
        nothing until one grace (at least a lease) after it is back; so the lease cannot be
        taken before `sent_at` plus one lifetime, and the fence moves there. Not a renewal: the
        heartbeat loop keeps retrying, and renews as soon as the database answers again.
        """
        self._extend_fence(sent_at, self.lifetime)

    def _extend_fence(self, sent_at: float, lifetime: float | None) -> None:
        if lifetime is None or self.done or self.lost.is_set():
            return
        margin = min(MAX_FENCE_MARGIN, lifetime * FENCE_MARGIN_FRACTION)
        fence_at = sent_at + lifetime - margin
        if self.fence_at is not None and fence_at <= self.fence_at:
            return  # an older round answered late: it cannot shorten what a newer one granted
        self.fence_at = fence_at
        if self._fence_handle is not None:
            self._fence_handle.cancel()
        self._fence_handle = self._loop.call_at(fence_at, self._fence)

    def _fence(self) -> None:
        self._fence_handle = None
        if self.done or self.lost.is_set():
            return
        self.fenced = True
        self.log.warning(
            "lease not renewed before it expires: stopping the job (self-fenced)",
            extra={"attempt": self.lease.attempt},
        )
        self.stop(StopReason.LOST)

    def close(self) -> None:
        """The job task is over: no fence timer may outlive it."""
        if self._fence_handle is not None:
            self._fence_handle.cancel()
            self._fence_handle = None

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
        does not interrupt that (finishing beats releasing the work), a loss or a
        cancellation does.
        """
        reason = self.stop_reason
        if reason is None or (finishing and reason is StopReason.SHUTDOWN):
            return
        raise JobStopped(reason.name)
