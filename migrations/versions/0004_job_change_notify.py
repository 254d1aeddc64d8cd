"""NOTIFY on every status or progress change, so WatchJob streams push changes as they happen.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION video_analysis_jobs_notify_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('video_analysis_jobs_changed', NEW.id::text);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER video_analysis_jobs_changed
        AFTER UPDATE ON video_analysis_jobs
        FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status
              OR OLD.progress_pct IS DISTINCT FROM NEW.progress_pct
              OR OLD.cancel_requested IS DISTINCT FROM NEW.cancel_requested)
        EXECUTE FUNCTION video_analysis_jobs_notify_changed()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER video_analysis_jobs_changed ON video_analysis_jobs")
    op.execute("DROP FUNCTION video_analysis_jobs_notify_changed()")
