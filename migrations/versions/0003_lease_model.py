"""The lease model: fenced leases, attempts and backoff, idempotent initiate, verified upload
facts, error history, and a NOTIFY when a job becomes claimable.

Existing rows keep their status: jobs already `queued` stay claimable.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

T = "video_analysis_jobs"
UUID = postgresql.UUID(as_uuid=True)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    for col in (
        sa.Column("request_id", UUID),
        sa.Column("upload_expires_at", TS),
        sa.Column("observed_size", sa.BigInteger()),
        sa.Column("etag", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="5"),
        sa.Column("available_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("lease_token", UUID),
        sa.Column("last_lease_token", UUID),
        sa.Column("last_lease_outcome", sa.Text()),
        sa.Column("leased_by", sa.Text()),
        sa.Column("leased_at", TS),
        sa.Column("lease_expires_at", TS),
        sa.Column("stage_started_at", TS),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default="false"),
        sa.Column("error_retryable", sa.Boolean(), nullable=False, server_default="false"),
        sa.Column("error_attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error_at", TS),
        sa.Column("result", postgresql.JSONB()),
        sa.Column("results_uri", sa.Text()),
    ):
        op.add_column(T, col)
    # Jobs queued before this revision become claimable in creation order.
    op.execute(f"UPDATE {T} SET available_at = created_at")
    op.create_unique_constraint("uq_video_analysis_jobs_request_id", T, ["request_id"])
    op.create_index(
        "ix_video_analysis_jobs_claimable",
        T,
        ["available_at", "created_at"],
        postgresql_where=sa.text("status IN ('queued', 'quick_done') AND lease_token IS NULL"),
    )
    op.create_index(
        "ix_video_analysis_jobs_lease_expires_at",
        T,
        ["lease_expires_at"],
        postgresql_where=sa.text("lease_token IS NOT NULL"),
    )
    op.create_index("ix_video_analysis_jobs_status_updated_at", T, ["status", "updated_at"])
    op.create_table(
        "video_analysis_job_errors",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("job_id", UUID, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("retryable", sa.Boolean(), nullable=False),
        sa.Column("worker_id", sa.Text()),
        sa.Column("occurred_at", TS, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_video_analysis_job_errors"),
        sa.ForeignKeyConstraint(
            ["job_id"],
            [f"{T}.id"],
            name="fk_video_analysis_job_errors_job_id_video_analysis_jobs",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_video_analysis_job_errors_job_id", "video_analysis_job_errors", ["job_id"])
    # Wakes ClaimJob long-polls: one notification per row that becomes claimable now.
    op.execute(
        """
        CREATE FUNCTION video_analysis_jobs_notify_claimable() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('video_analysis_jobs_claimable', NEW.id::text);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER video_analysis_jobs_claimable
        AFTER INSERT OR UPDATE OF status, lease_token, available_at ON {T}
        FOR EACH ROW
        WHEN (NEW.status IN ('queued', 'quick_done') AND NEW.lease_token IS NULL
              AND NEW.available_at <= now())
        EXECUTE FUNCTION video_analysis_jobs_notify_claimable()
        """
    )


def downgrade() -> None:
    op.execute(f"DROP TRIGGER video_analysis_jobs_claimable ON {T}")
    op.execute("DROP FUNCTION video_analysis_jobs_notify_claimable()")
    op.drop_table("video_analysis_job_errors")
    op.drop_index("ix_video_analysis_jobs_status_updated_at", T)
    op.drop_index("ix_video_analysis_jobs_lease_expires_at", T)
    op.drop_index("ix_video_analysis_jobs_claimable", T)
    op.drop_constraint("uq_video_analysis_jobs_request_id", T)
    for name in (
        "results_uri",
        "result",
        "error_at",
        "error_attempt",
        "error_retryable",
        "cancel_requested",
        "stage_started_at",
        "lease_expires_at",
        "leased_at",
        "leased_by",
        "last_lease_outcome",
        "last_lease_token",
        "lease_token",
        "available_at",
        "max_attempts",
        "attempts",
        "etag",
        "observed_size",
        "upload_expires_at",
        "request_id",
    ):
        op.drop_column(T, name)
