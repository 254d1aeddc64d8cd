"""The schema as it stood before uploads were verified: jobs were created straight in `queued`.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

OLD_STATUSES = ("queued", "quick_running", "quick_done", "deep_running", "done", "failed")


def upgrade() -> None:
    job_status = postgresql.ENUM(*OLD_STATUSES, name="video_analysis_job_status")
    session_status = postgresql.ENUM("pending", "uploaded", name="video_session_status")
    job_status.create(op.get_bind())
    session_status.create(op.get_bind())
    op.create_table(
        "video_sessions",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "status",
            postgresql.ENUM(name="video_session_status", create_type=False),
            nullable=False,
            server_default="pending",
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("id", name="pk_video_sessions"),
    )
    op.create_table(
        "video_analysis_jobs",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("session_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "status",
            postgresql.ENUM(name="video_analysis_job_status", create_type=False),
            nullable=False,
        ),
        sa.Column("stage", sa.Text(), nullable=False),
        sa.Column("progress_pct", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("s3_bucket", sa.Text(), nullable=False),
        sa.Column("s3_key", sa.Text(), nullable=False),
        sa.Column("error_code", sa.Text()),
        sa.Column("error_message", sa.Text()),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("id", name="pk_video_analysis_jobs"),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["video_sessions.id"],
            name="fk_video_analysis_jobs_session_id_video_sessions",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_video_analysis_jobs_session_id", "video_analysis_jobs", ["session_id"])


def downgrade() -> None:
    op.drop_table("video_analysis_jobs")
    op.drop_table("video_sessions")
    op.execute("DROP TYPE video_analysis_job_status")
    op.execute("DROP TYPE video_session_status")
