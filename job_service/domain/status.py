"""Job statuses and the one state machine every status change goes through.

```
awaiting_upload -> queued -> quick_running -> quick_done -> deep_running -> done
      |              |            |               |              |
      +--------------+------------+---------------+--------------+--> failed
```
Leases add the edges that put work back in the queue: a running job whose lease is released,
expired or retried goes back to `queued` (quick pass not done) or stays/returns to `quick_done`
(resume at the deep pass). `failed` is the dead letter; a redrive (upload re-verified or an
operator requeue) takes it back to `queued`.
"""

from __future__ import annotations

import enum
from typing import assert_never

from job_service.domain.errors import InvalidTransition


class JobStatus(enum.StrEnum):
    awaiting_upload = "awaiting_upload"
    queued = "queued"
    quick_running = "quick_running"
    quick_done = "quick_done"
    deep_running = "deep_running"
    done = "done"
    failed = "failed"

    @property
    def stage(self) -> str:
        """The design note's `stage` column: the status name in upper case."""
        return self.value.upper()


#: Statuses a claim may take a job from, when no lease holds it.
CLAIMABLE: frozenset[JobStatus] = frozenset({JobStatus.queued, JobStatus.quick_done})
#: Statuses in which a job is (or was) held by a worker's lease.
LEASED: frozenset[JobStatus] = frozenset(
    {JobStatus.quick_running, JobStatus.quick_done, JobStatus.deep_running}
)
TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.done, JobStatus.failed})
#: Statuses in which CompleteUpload has nothing left to do.
UPLOAD_ACCEPTED: frozenset[JobStatus] = frozenset(
    {
        JobStatus.queued,
        JobStatus.quick_running,
        JobStatus.quick_done,
        JobStatus.deep_running,
        JobStatus.done,
    }
)

_S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    _S.awaiting_upload: frozenset({_S.queued, _S.failed}),
    # queued -> quick_running by a claim.
    _S.queued: frozenset({_S.quick_running, _S.failed}),
    # quick_running -> queued: lease released, expired or retried before the quick pass ended.
    _S.quick_running: frozenset({_S.quick_done, _S.queued, _S.failed}),
    # quick_done -> deep_running: the same worker goes on, or a later claim resumes there.
    _S.quick_done: frozenset({_S.deep_running, _S.failed}),
    # deep_running -> quick_done: lease lost or retried; the quick pass is not redone.
    _S.deep_running: frozenset({_S.done, _S.quick_done, _S.failed}),
    _S.done: frozenset(),
    # failed -> queued: upload re-verified (CompleteUpload) or an operator's requeue.
    _S.failed: frozenset({_S.queued}),
}


def can_transition(src: JobStatus, dst: JobStatus) -> bool:
    return dst in TRANSITIONS[src]


def check_transition(src: JobStatus, dst: JobStatus) -> None:
    """Raise InvalidTransition unless src -> dst is an edge of the state machine."""
    if not can_transition(src, dst):
        raise InvalidTransition(src, dst)


def requeue_status(current: JobStatus) -> JobStatus:
    """Where a job goes when its lease ends without finishing: resume at the stage reached."""
    match current:
        case JobStatus.quick_done | JobStatus.deep_running:
            return JobStatus.quick_done
        case (
            JobStatus.awaiting_upload
            | JobStatus.queued
            | JobStatus.quick_running
            | JobStatus.done
            | JobStatus.failed
        ):
            return JobStatus.queued
        case _:
            assert_never(current)


def running_status_for_claim(current: JobStatus) -> JobStatus:
    """The status a claim puts a job in: the quick pass, or straight to the deep pass."""
    match current:
        case JobStatus.quick_done:
            return JobStatus.deep_running
        case JobStatus.queued:
            return JobStatus.quick_running
        case (
            JobStatus.awaiting_upload
            | JobStatus.quick_running
            | JobStatus.deep_running
            | JobStatus.done
            | JobStatus.failed
        ):
            raise InvalidTransition(current, JobStatus.quick_running)
        case _:
            assert_never(current)
