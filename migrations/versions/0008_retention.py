"""Retention of finished jobs: a partial index over finished jobs by their last change, so the
purge finds the oldest ones without scanning active or recent rows.

Built CONCURRENTLY (in an autocommit block) so upgrading a database with a long history does
not block writes. A concurrent build that fails leaves an INVALID index: drop it and run the
upgrade again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEX = "ix_video_analysis_jobs_finished"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            INDEX,
            "video_analysis_jobs",
            ["updated_at"],
            postgresql_where=sa.text("status IN ('done', 'failed')"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, "video_analysis_jobs", postgresql_concurrently=True, if_exists=True)
