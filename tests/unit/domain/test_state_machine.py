"""Every allowed and every forbidden transition of the state machine, and the pure decisions
around it (fencing, upload verification, backoff)."""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from job_service.domain import codes, errors
from job_service.domain.model import (
    Fence,
    Job,
    JobId,
    JobRetryPolicy,
    LeaseOutcome,
    LeaseToken,
    ObjectInfo,
    SessionId,
    fence,
    validate_new_upload,
    verify_upload,
)
from job_service.domain.status import (
    CLAIMABLE,
    JobStatus,
    can_transition,
    check_transition,
    requeue_status,
    running_status_for_claim,
)

S = JobStatus
ALLOWED = {
    (S.awaiting_upload, S.queued),
    (S.awaiting_upload, S.failed),
    (S.queued, S.quick_running),
    (S.queued, S.failed),
    (S.quick_running, S.quick_done),
    (S.quick_running, S.queued),
    (S.quick_running, S.failed),
    (S.quick_done, S.deep_running),
    (S.quick_done, S.failed),
    (S.deep_running, S.done),
    (S.deep_running, S.quick_done),
    (S.deep_running, S.failed),
    (S.failed, S.queued),
}


@pytest.mark.parametrize(("src", "dst"), sorted(ALLOWED))
def test_allowed_transition(src, dst):
    assert can_transition(src, dst)
    check_transition(src, dst)


FORBIDDEN = sorted(set(itertools.product(S, S)) - ALLOWED)


@pytest.mark.parametrize(("src", "dst"), FORBIDDEN)
def test_forbidden_transition(src, dst):
    assert not can_transition(src, dst)
    with pytest.raises(errors.InvalidTransition) as err:
        check_transition(src, dst)
    assert err.value.kind is errors.ErrorKind.FAILED_PRECONDITION
    assert src.value in err.value.message and dst.value in err.value.message


def test_forbidden_list_covers_the_rest():
    assert len(ALLOWED) + len(FORBIDDEN) == len(S) ** 2
    # awaiting_upload is reachable only at creation: nothing moves a job back into it.
    assert all(dst is not S.awaiting_upload for _, dst in ALLOWED)
    assert S.awaiting_upload not in CLAIMABLE


def test_resume_at_the_stage_reached():
    assert requeue_status(S.quick_running) is S.queued
    assert requeue_status(S.quick_done) is S.quick_done
    assert requeue_status(S.deep_running) is S.quick_done
    assert running_status_for_claim(S.queued) is S.quick_running
    assert running_status_for_claim(S.quick_done) is S.deep_running
    with pytest.raises(errors.InvalidTransition):
        running_status_for_claim(S.awaiting_upload)


def make_job(**kw) -> Job:
    now = datetime.now(UTC)
    base = dict(
        id=JobId(uuid.uuid4()),
        session_id=SessionId(uuid.uuid4()),
        status=S.quick_running,
        progress_pct=0,
        filename="a.mp4",
        content_type="video/mp4",
        size_bytes=100,
        bucket="videos",
        key="uploads/x/source",
        request_id=None,
        attempts=1,
        max_attempts=5,
        created_at=now,
        updated_at=now,
        available_at=now,
    )
    base.update(kw)
    return Job(**base)


def test_fence_proceeds_only_with_the_live_token():
    token = LeaseToken(uuid.uuid4())
    job = make_job(lease_token=token, last_lease_token=token)
    assert fence(job, token, replay_outcomes=frozenset()) is Fence.PROCEED
    with pytest.raises(errors.LeaseLost) as err:
        fence(job, LeaseToken(uuid.uuid4()), replay_outcomes=frozenset())
    assert err.value.kind is errors.ErrorKind.ABORTED


def test_fence_replays_a_call_that_already_succeeded():
    token = LeaseToken(uuid.uuid4())
    done = make_job(
        status=S.done, last_lease_token=token, last_lease_outcome=LeaseOutcome.completed
    )
    assert fence(done, token, replay_outcomes=frozenset({LeaseOutcome.completed})) is Fence.REPLAY
    # ... but not a different call after the lease ended.
    with pytest.raises(errors.LeaseLost, match="already ended"):
        fence(done, token, replay_outcomes=frozenset({LeaseOutcome.failed}))
    expired = make_job(
        status=S.queued, last_lease_token=token, last_lease_outcome=LeaseOutcome.expired
    )
    with pytest.raises(errors.LeaseLost):
        fence(expired, token, replay_outcomes=frozenset({LeaseOutcome.completed}))


def test_verify_upload_verdicts():
    job = make_job(status=S.awaiting_upload, size_bytes=100)
    assert verify_upload(job, ObjectInfo(100, "e", "video/mp4")) is None
    assert verify_upload(job, None).code == codes.UPLOAD_OBJECT_NOT_FOUND
    assert verify_upload(job, ObjectInfo(0, "e", "video/mp4")).code == codes.UPLOAD_EMPTY
    assert verify_upload(job, ObjectInfo(99, "e", "video/mp4")).code == codes.UPLOAD_SIZE_MISMATCH
    assert (
        verify_upload(job, ObjectInfo(100, "e", "text/plain")).code
        == codes.UPLOAD_CONTENT_TYPE_MISMATCH
    )


def test_backoff_grows_is_jittered_and_capped():
    policy = JobRetryPolicy(5, timedelta(seconds=2), timedelta(seconds=30))
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(1, 8)]
    for n, d in enumerate(delays, start=1):
        ceiling = min(30, 2 * 2 ** (n - 1))
        assert ceiling / 2 <= d.total_seconds() <= ceiling
    assert len({policy.delay(3, rng) for _ in range(20)}) > 1  # jitter
    assert policy.exhausted(5) and not policy.exhausted(4)


def test_upload_validation_accepts_a_good_request():
    up = validate_new_upload(
        filename=" clip.mov ",
        content_type="video/quicktime",
        size_bytes=1,
        session_id="",
        request_id="",
        max_upload_bytes=10,
    )
    assert (up.filename, up.content_type, up.session_id, up.request_id) == (
        "clip.mov",
        "video/quicktime",
        None,
        None,
    )
