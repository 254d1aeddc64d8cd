"""The lease path: infrastructure-failure budget and hot-path schema (issue: lease performance
and fault tolerance).

- `infrastructure_failing_since`: when the job's infrastructure failures in a row began (the
  infrastructure retry window counts from here); cleared on progress.
- `error_infrastructure` on jobs and `infrastructure` on the error history: the stored error was
  infrastructure trouble and spent no attempt.
- Heartbeats become HOT updates: the reaper's index no longer contains `lease_expires_at` (the
  only column a heartbeat writes), and the table keeps 20 % of each page free for the new row
  versions.
- The change NOTIFY (revision 0004) is sent only for jobs a WatchJob stream watches
  (`video_analysis_job_watches`, kept by each service instance): Postgres serialises the commits
  of notifying transactions, and every lease call changed a status or the progress.
- The claimable NOTIFY also fires when a job is requeued with a backoff, with the time it becomes
  claimable as its payload (`at:<epoch seconds>`), so every instance can set a timer instead of
  polling for backoffs running out.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

T = "video_analysis_jobs"
E = "video_analysis_job_errors"

_NOTIFY_V2 = """
CREATE OR REPLACE FUNCTION video_analysis_jobs_notify_claimable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.available_at <= now() THEN
        PERFORM pg_notify('video_analysis_jobs_claimable', NEW.id::text);
    ELSE
        PERFORM pg_notify('video_analysis_jobs_claimable',
                          'at:' || extract(epoch FROM NEW.available_at)::text);
    END IF;
    RETURN NULL;
END
$$
"""
_NOTIFY_V1 = """
CREATE OR REPLACE FUNCTION video_analysis_jobs_notify_claimable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('video_analysis_jobs_claimable', NEW.id::text);
    RETURN NULL;
END
$$
"""


_CHANGED_V2 = """
CREATE OR REPLACE FUNCTION video_analysis_jobs_notify_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM video_analysis_job_watches WHERE job_id = NEW.id) THEN
        PERFORM pg_notify('video_analysis_jobs_changed', NEW.id::text);
    END IF;
    RETURN NULL;
END
$$
"""
_CHANGED_V1 = """
CREATE OR REPLACE FUNCTION video_analysis_jobs_notify_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('video_analysis_jobs_changed', NEW.id::text);
    RETURN NULL;
END
$$
"""


def _trigger(when: str) -> str:
    return f"""
        CREATE TRIGGER video_analysis_jobs_claimable
        AFTER INSERT OR UPDATE OF status, lease_token, available_at ON {T}
        FOR EACH ROW
        WHEN ({when})
        EXECUTE FUNCTION video_analysis_jobs_notify_claimable()
    """


def upgrade() -> None:
    op.add_column(T, sa.Column("infrastructure_failing_since", sa.DateTime(timezone=True)))
    op.add_column(
        T,
        sa.Column("error_infrastructure", sa.Boolean(), nullable=False, server_default="false"),
    )
    op.add_column(
        E, sa.Column("infrastructure", sa.Boolean(), nullable=False, server_default="false")
    )
    op.drop_index("ix_video_analysis_jobs_lease_expires_at", T)
    op.create_index(
        "ix_video_analysis_jobs_leased",
        T,
        ["leased_at"],
        postgresql_where=sa.text("lease_token IS NOT NULL"),
    )
    # Existing pages fill up as rows are updated; new pages keep room for HOT updates.
    op.execute(f"ALTER TABLE {T} SET (fillfactor = 80)")
    op.create_table(
        "video_analysis_job_watches",
        sa.Column("job_id", sa.dialects.postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("instance_id", sa.dialects.postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "instance_id", name="pk_video_analysis_job_watches"),
    )
    op.execute(_CHANGED_V2)
    op.execute(_NOTIFY_V2)
    op.execute(f"DROP TRIGGER video_analysis_jobs_claimable ON {T}")
    op.execute(_trigger("NEW.status IN ('queued', 'quick_done') AND NEW.lease_token IS NULL"))


def downgrade() -> None:
    op.execute(f"DROP TRIGGER video_analysis_jobs_claimable ON {T}")
    op.execute(
        _trigger(
            "NEW.status IN ('queued', 'quick_done') AND NEW.lease_token IS NULL "
            "AND NEW.available_at <= now()"
        )
    )
    op.execute(_NOTIFY_V1)
    op.execute(_CHANGED_V1)
    op.drop_table("video_analysis_job_watches")
    op.execute(f"ALTER TABLE {T} RESET (fillfactor)")
    op.drop_index("ix_video_analysis_jobs_leased", T)
    op.create_index(
        "ix_video_analysis_jobs_lease_expires_at",
        T,
        ["lease_expires_at"],
        postgresql_where=sa.text("lease_token IS NOT NULL"),
    )
    op.drop_column(E, "infrastructure")
    op.drop_column(T, "error_infrastructure")
    op.drop_column(T, "infrastructure_failing_since")
