"""Add `awaiting_upload` before `queued`: jobs wait there until their upload is verified.

Forward-only: PostgreSQL cannot drop an enum value. ADD VALUE runs in an autocommit block so
the value is committed before any later revision uses it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "ALTER TYPE video_analysis_job_status "
            "ADD VALUE IF NOT EXISTS 'awaiting_upload' BEFORE 'queued'"
        )


def downgrade() -> None:
    # The value stays: existing code never produces it, and removing an enum value means
    # rebuilding the type. Rolling back code is enough (see docs/operations.md).
    pass
