"""The lease path's SQL text, for the asyncpg lease pool in autocommit (`LeaseStore` runs it).

Each statement is a single conditional one, so the database, not Python, decides who wins a
race, in one round trip."""

from __future__ import annotations

from collections.abc import Mapping

from job_service.domain import codes
from job_service.domain.lease_policy import CANCELLED_MESSAGE
from job_service.domain.status import (
    CLAIMABLE,
    LEASED,
    JobStatus,
    requeue_status,
    running_status_for_claim,
)
from job_service.storage.db import LEASE_APPLICATION_NAME
from job_service.storage.tables import job_errors, job_watches, jobs

# -- the lease path: named operations on the lease pool (asyncpg, autocommit) -----------------
#
# Each operation is one statement: a whole state change, including the lease columns it clears,
# conditional on the caller's (job_id, lease_token) and the statuses the change is allowed
# from. asyncpg prepares each statement once per connection. An operation returns None when its
# condition matched nothing; the use case then reads the row (`diagnose`) to tell a lost lease
# from a replay, a missing job or an invalid transition.

_T = jobs.name
_E = job_errors.name
_STATUS_TYPE = "video_analysis_job_status"


def _case(column: str, mapping: Mapping[JobStatus, JobStatus], *, upper: bool = False) -> str:
    """CASE over a status column from a mapping the state machine provides."""
    arms = " ".join(
        f"WHEN '{src.value}' THEN '{dst.stage if upper else dst.value}'"
        for src, dst in sorted(mapping.items())
    )
    return f"CASE {column}::text {arms} END" + ("" if upper else f"::{_STATUS_TYPE}")


def _in(statuses: frozenset[JobStatus]) -> str:
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(statuses)) + ")"


_CLAIM_TO = {s: running_status_for_claim(s) for s in CLAIMABLE}
_REQUEUE_TO = {s: requeue_status(s) for s in LEASED}
_CLEAR_LEASE = "lease_token = NULL, leased_by = NULL, lease_expires_at = NULL"

# The claimable predicate is the claimable index's predicate, word for word (the planner
# matches it), plus the backoff.
_CLAIMABLE = f"status IN {_in(CLAIMABLE)} AND lease_token IS NULL"


def _claim(order: str) -> str:
    return f"""
WITH picked AS (
    SELECT id FROM {_T}
    WHERE {_CLAIMABLE} AND available_at <= now()
    ORDER BY {order}
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT id, row_number() OVER () AS n FROM picked
)
UPDATE {_T} j SET
    status = {_case("j.status", _CLAIM_TO)},
    stage = {_case("j.status", _CLAIM_TO, upper=True)},
    lease_token = ($3::uuid[])[numbered.n],
    last_lease_token = ($3::uuid[])[numbered.n],
    last_lease_outcome = NULL,
    leased_by = ($1::text[])[numbered.n],
    leased_at = now(),
    stage_started_at = now(),
    lease_expires_at = now() + make_interval(secs => $4),
    attempts = j.attempts + 1,
    cancel_requested = false,
    first_claimed_at = coalesce(j.first_claimed_at, now()),
    updated_at = now()
FROM numbered
WHERE j.id = numbered.id
RETURNING j.*
"""


#: Oldest first (JOB_SERVICE_FAIR_CLAIM=false): the claimable index in (available_at,
#: created_at) order.
SQL_CLAIM_FIFO = _claim("available_at, created_at")
#: Fair shares between tenants (revision 0011): the fair index in key order. The same one
#: index scan, whatever the number of tenants or the size of any backlog; rows in a backoff
#: (available_at in the future) are skipped by the filter as in FIFO.
SQL_CLAIM_FAIR = _claim("fair_key, fair_rank")
SQL_CLAIM = SQL_CLAIM_FAIR


def claim_sql(*, fair: bool) -> str:
    return SQL_CLAIM_FAIR if fair else SQL_CLAIM_FIFO


#: When the next job in a backoff becomes claimable (the claimable index answers it).
SQL_NEXT_AVAILABLE = f"""
SELECT min(available_at) AS at, bool_or(available_at <= now()) AS now_claimable FROM {_T}
WHERE {_CLAIMABLE}
"""

# Renewal writes lease_expires_at only, which no index contains: a HOT update. The rows are
# locked in job id order (LockRows above the Sort), so overlapping heartbeats cannot deadlock.
SQL_RENEW = f"""
WITH held AS (
    SELECT j.id FROM {_T} j
    JOIN unnest($1::uuid[], $2::uuid[]) AS r(id, token)
      ON j.id = r.id AND j.lease_token = r.token
    WHERE j.status IN {_in(LEASED)}
      AND j.stage_started_at + make_interval(secs => $4) > now()
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE {_T} j SET lease_expires_at = now() + make_interval(secs => $3)
FROM held
WHERE j.id = held.id
RETURNING j.id, j.lease_token, j.lease_expires_at, j.cancel_requested
"""


def _advance_set(*, progress: str, result: str) -> str:
    """ReportProgress's change ($3: the target status or NULL), one item's values from
    `progress` and `result`: the same for the single and the batched statement."""
    return f"""
    status = coalesce($3::text::{_STATUS_TYPE}, j.status),
    stage = coalesce(upper($3::text), j.stage),
    progress_pct = {progress},
    result = coalesce({result}, j.result),
    stage_started_at = CASE WHEN $3::text = 'deep_running' AND j.status <> 'deep_running'
                            THEN now() ELSE j.stage_started_at END,
    infrastructure_failing_since = CASE WHEN $3::text IS NOT NULL AND $3::text <> j.status::text
                                        THEN NULL ELSE j.infrastructure_failing_since END,
    updated_at = now()"""


def _complete_set(*, result: str, uri: str) -> str:
    """CompleteJob's change, likewise."""
    return f"""
    status = 'done', stage = 'DONE', progress_pct = 100,
    result = coalesce({result}, j.result),
    results_uri = nullif({uri}, ''),
    {_CLEAR_LEASE},
    last_lease_outcome = 'completed',
    infrastructure_failing_since = NULL,
    updated_at = now()"""


# $3: target status or NULL (keep); $6: statuses the change may start from.
SQL_ADVANCE = f"""
WITH old AS (
    SELECT id, status FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND status::text = ANY($6::text[])
    FOR UPDATE
)
UPDATE {_T} j SET {_advance_set(progress="$4", result="$5::jsonb")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.status::text AS prev_status
"""

SQL_COMPLETE = f"""
WITH old AS (
    SELECT id, leased_by FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND status = 'deep_running'
    FOR UPDATE
)
UPDATE {_T} j SET {_complete_set(result="$3::jsonb", uri="$4::text")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

# The batched forms of ADVANCE and COMPLETE: the same change for many leases in one statement,
# each item with its own values (from unnest), the rows locked in job id order like SQL_RENEW.
# JSON travels as text and is cast in SQL (asyncpg's jsonb codec does not reach into arrays).
SQL_ADVANCE_MANY = f"""
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $4::int[], $5::text[])
        AS r(id, token, pct, result)
), old AS (
    SELECT j.id, j.status, req.pct, req.result::jsonb AS result FROM {_T} j
    JOIN req ON j.id = req.id AND j.lease_token = req.token
    WHERE j.status::text = ANY($6::text[])
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE {_T} j SET {_advance_set(progress="old.pct", result="old.result")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.status::text AS prev_status
"""

SQL_COMPLETE_MANY = f"""
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
        AS r(id, token, result, uri)
), old AS (
    SELECT j.id, j.leased_by, req.result::jsonb AS result, req.uri FROM {_T} j
    JOIN req ON j.id = req.id AND j.lease_token = req.token
    WHERE j.status = 'deep_running'
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE {_T} j SET {_complete_set(result="old.result", uri="old.uri")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

# A lease handed back: no attempt counted, claimable at once; an operator's cancel wins.
_RELEASE_SET = f"""
    status = CASE WHEN j.cancel_requested THEN 'failed'::{_STATUS_TYPE}
                  ELSE {_case("j.status", _REQUEUE_TO)} END,
    stage = CASE WHEN j.cancel_requested THEN 'FAILED'
                 ELSE {_case("j.status", _REQUEUE_TO, upper=True)} END,
    attempts = CASE WHEN j.cancel_requested THEN j.attempts ELSE greatest(j.attempts - 1, 0) END,
    available_at = CASE WHEN j.cancel_requested THEN j.available_at ELSE now() END,
    error_code = CASE WHEN j.cancel_requested THEN 'CANCELLED' ELSE j.error_code END,
    error_message = CASE WHEN j.cancel_requested THEN 'cancelled by an operator'
                         ELSE j.error_message END,
    error_retryable = CASE WHEN j.cancel_requested THEN false ELSE j.error_retryable END,
    error_attempt = CASE WHEN j.cancel_requested THEN j.attempts ELSE j.error_attempt END,
    error_at = CASE WHEN j.cancel_requested THEN now() ELSE j.error_at END,
    error_infrastructure = CASE WHEN j.cancel_requested THEN false
                                ELSE j.error_infrastructure END,
    {_CLEAR_LEASE},
    last_lease_outcome = 'released',
    updated_at = now()
"""

SQL_RELEASE = f"""
WITH old AS (
    SELECT id, leased_by FROM {_T} WHERE id = $1 AND lease_token = $2 FOR UPDATE
)
UPDATE {_T} j SET {_RELEASE_SET}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

#: Hand back leases whose claim answer never reached its caller (by the tokens it was given).
SQL_HAND_BACK = f"""
UPDATE {_T} j SET {_RELEASE_SET}
WHERE j.lease_token = ANY($1::uuid[])
RETURNING j.id
"""

#: The diagnostic read after a conditional statement matched nothing. FOR UPDATE waits for a
#: change in flight to commit, so the row read is the one that decided.
SQL_DIAGNOSE = f"SELECT *, now() AS db_now FROM {_T} WHERE id = $1 FOR UPDATE"
SQL_READ = f"SELECT *, now() AS db_now FROM {_T} WHERE id = $1"

# End a lease as the use case decided (fail, retry, infrastructure requeue, rescue), guarded
# by what the decision was based on: the token, the attempt and the cancel flag. Records the
# error in the history in the same statement.
#   $1 id  $2 token  $3 attempts read  $4 cancel_requested read
#   $5 status  $6 attempts  $7 delay seconds (NULL: keep available_at)
#   $8..$12 stored error (code, message, retryable, attempt, infrastructure)
#   $13 infrastructure_failing_since: 'set' | 'clear' | 'keep'  $14 lease outcome
#   $15..$19 history row (code, message, retryable, attempt, infrastructure)
SQL_END_LEASE = f"""
WITH old AS (
    SELECT id, leased_by FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND attempts = $3 AND cancel_requested = $4
    FOR UPDATE
), history AS (
    INSERT INTO {_E} (job_id, attempt, code, message, retryable, worker_id, infrastructure)
    SELECT id, $18, $15, $16, $17, leased_by, $19 FROM old
)
UPDATE {_T} j SET
    status = $5::text::{_STATUS_TYPE},
    stage = upper($5::text),
    attempts = $6,
    available_at = CASE WHEN $7::float8 IS NULL THEN j.available_at
                        ELSE now() + make_interval(secs => $7::float8) END,
    error_code = $8, error_message = $9, error_retryable = $10, error_attempt = $11,
    error_infrastructure = $12, error_at = now(),
    infrastructure_failing_since = CASE $13::text
        WHEN 'set' THEN coalesce(j.infrastructure_failing_since, now())
        WHEN 'clear' THEN NULL
        ELSE j.infrastructure_failing_since END,
    {_CLEAR_LEASE},
    last_lease_outcome = $14,
    updated_at = now()
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

# FailJob in one statement: decide how the lease ends from the row it locks (the branches of
# domain.lease_policy.decide_failure, its specification; a test runs both on every branch) and
# apply it, with the history row. The jitter factor is drawn by the caller.
#   $1 id  $2 token  $3 code  $4 message  $5 retryable (as reported)  $6 infrastructure
#   $7 the code is CANCELLED  $8 the default max attempts  $9, $10 retry base and cap (s)
#   $11, $12, $13 infrastructure base, cap and window (s)  $14 the window as the message says
#   it  $15 jitter factor (0.5-1)
SQL_FAIL = f"""
WITH old AS (
    SELECT id, leased_by, status, attempts, cancel_requested,
           coalesce(nullif(max_attempts, 0), $8::int) AS max_att,
           greatest(extract(epoch FROM now() - coalesce(infrastructure_failing_since, now())),
                    0)::float8 AS elapsed
    FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND status IN {_in(LEASED)}
    FOR UPDATE
), d AS (
    SELECT old.*, CASE
        WHEN cancel_requested AND NOT $7::bool THEN 'cancel'
        WHEN $6::bool AND elapsed >= $13::float8 THEN 'gave_up'
        WHEN $6::bool THEN 'infra_retry'
        WHEN $5::bool AND attempts < max_att AND NOT $7::bool THEN 'retry'
        ELSE 'fail' END AS branch
    FROM old
), history AS (
    INSERT INTO {_E} (job_id, attempt, code, message, retryable, worker_id, infrastructure)
    SELECT id, attempts, $3::text, $4::text, $5::bool OR $6::bool, leased_by, $6::bool FROM d
), decided AS (
    SELECT d.*, CASE WHEN d.branch IN ('retry', 'infra_retry') THEN {_case("d.status", _REQUEUE_TO)}
                     ELSE 'failed'::{_STATUS_TYPE} END AS next_status
    FROM d
)
UPDATE {_T} j SET
    status = decided.next_status,
    stage = upper(decided.next_status::text),
    attempts = CASE WHEN $6::bool THEN greatest(decided.attempts - 1, 0) ELSE decided.attempts END,
    available_at = CASE decided.branch
        WHEN 'infra_retry' THEN now() + make_interval(
            secs => least($12::float8, greatest($11::float8, decided.elapsed)) * $15::float8)
        WHEN 'retry' THEN now() + make_interval(
            secs => least($10::float8, $9::float8 * power(2, greatest(decided.attempts - 1, 0)))
                    * $15::float8)
        ELSE j.available_at END,
    error_code = CASE decided.branch WHEN 'cancel' THEN '{codes.CANCELLED}'
                                  WHEN 'gave_up' THEN '{codes.INFRASTRUCTURE_UNAVAILABLE}'
                                  ELSE $3::text END,
    error_message = CASE
        WHEN decided.branch = 'cancel' THEN '{CANCELLED_MESSAGE}'
        WHEN decided.branch = 'gave_up' THEN format(
            'infrastructure trouble for %s s, past the retry window of %s s; last: %s: %s',
            floor(decided.elapsed)::bigint, $14::text, $3::text, $4::text)
        WHEN decided.branch = 'fail' AND $5::bool AND decided.attempts >= decided.max_att
            THEN format('%s (gave up after %s attempts)', $4::text, decided.attempts)
        ELSE $4::text END,
    error_retryable = CASE WHEN decided.branch IN ('cancel', 'gave_up') THEN false
                           ELSE $5::bool OR $6::bool END,
    error_attempt = decided.attempts,
    error_infrastructure = decided.branch <> 'cancel' AND $6::bool,
    error_at = now(),
    infrastructure_failing_since = CASE decided.branch
        WHEN 'infra_retry' THEN coalesce(j.infrastructure_failing_since, now())
        WHEN 'retry' THEN NULL
        WHEN 'fail' THEN NULL
        ELSE j.infrastructure_failing_since END,
    {_CLEAR_LEASE},
    last_lease_outcome = CASE WHEN decided.branch IN ('retry', 'infra_retry') THEN 'retried'
                              ELSE 'failed' END,
    updated_at = now()
FROM decided
WHERE j.id = decided.id
RETURNING j.*, decided.leased_by AS prev_worker, decided.status AS prev_status
"""

SQL_EXPIRED = f"""
SELECT *, now() AS db_now FROM {_T}
WHERE lease_token IS NOT NULL AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

SQL_GET = f"SELECT * FROM {_T} WHERE id = $1"

_W = job_watches.name
SQL_WATCH = f"""
INSERT INTO {_W} (job_id, instance_id, expires_at)
SELECT j, $2, now() + make_interval(secs => $3) FROM unnest($1::uuid[]) AS j
ON CONFLICT (job_id, instance_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
SQL_UNWATCH = f"DELETE FROM {_W} WHERE instance_id = $1 AND job_id = ANY($2::uuid[])"
SQL_UNWATCH_ALL = f"DELETE FROM {_W} WHERE instance_id = $1 OR expires_at < now()"

#: Only ever one of our own lease-path backends (the pool's application_name).
SQL_END_BACKEND = f"""
SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
WHERE pid = $1 AND application_name = '{LEASE_APPLICATION_NAME}'
"""
