"""Remember when the reconciler last looked for a stale upload's object.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("video_analysis_jobs", sa.Column("upload_checked_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_video_analysis_jobs_awaiting_upload",
        "video_analysis_jobs",
        ["created_at"],
        postgresql_where=sa.text("status = 'awaiting_upload'"),
    )


def downgrade() -> None:
    op.drop_index("ix_video_analysis_jobs_awaiting_upload", "video_analysis_jobs")
    op.drop_column("video_analysis_jobs", "upload_checked_at")
