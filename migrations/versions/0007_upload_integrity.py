"""Uploads: multipart, checksums and re-verification.

Columns on video_analysis_jobs: the declared whole-file SHA-256 (`sha256`), the S3 multipart
upload (`upload_id`, `part_size`, `part_count`) and the checksum S3 reported at verification
(`checksum_sha256`, S3's base64 form; `<b64>-N` for multipart). A table keeps the SHA-256 each
part's URL was signed with: S3 (SeaweedFS) lists no part checksums, yet CompleteMultipartUpload
must name them and CompleteUpload checks the object's composite checksum against them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("video_analysis_jobs", sa.Column("sha256", sa.LargeBinary()))
    op.add_column("video_analysis_jobs", sa.Column("upload_id", sa.Text()))
    op.add_column("video_analysis_jobs", sa.Column("part_size", sa.BigInteger()))
    op.add_column("video_analysis_jobs", sa.Column("part_count", sa.Integer()))
    op.add_column("video_analysis_jobs", sa.Column("checksum_sha256", sa.Text()))
    op.create_table(
        "video_upload_parts",
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey(
                "video_analysis_jobs.id",
                ondelete="CASCADE",
                name="fk_video_upload_parts_job_id_video_analysis_jobs",
            ),
            nullable=False,
        ),
        sa.Column("part_number", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.LargeBinary(), nullable=False),
        sa.Column(
            "signed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("job_id", "part_number", name="pk_video_upload_parts"),
    )


def downgrade() -> None:
    op.drop_table("video_upload_parts")
    for column in ("checksum_sha256", "part_count", "part_size", "upload_id", "sha256"):
        op.drop_column("video_analysis_jobs", column)
