"""Security (issue 10): jobs belong to the subject that created them, request_id is unique per
subject, and revoked bearer tokens are listed by jti.

The new column has a constant default (a catalog-only change). The per-owner unique index is
built CONCURRENTLY, then attached as the constraint, so a long history does not block writes;
the old global constraint goes last. Existing jobs get owner "" (only operators see them).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLE = "video_analysis_jobs"
NEW = "uq_video_analysis_jobs_owner_request"
OLD = "uq_video_analysis_jobs_request_id"


def upgrade() -> None:
    op.add_column(TABLE, sa.Column("owner_subject", sa.Text(), nullable=False, server_default=""))
    with op.get_context().autocommit_block():
        op.execute(
            f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {NEW} "
            f"ON {TABLE} (owner_subject, request_id)"
        )
    op.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {NEW} UNIQUE USING INDEX {NEW}")
    op.drop_constraint(OLD, TABLE, type_="unique")
    op.create_table(
        "auth_revoked_tokens",
        sa.Column("jti", sa.Text(), primary_key=True),
        sa.Column("subject", sa.Text(), nullable=False, server_default=""),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column(
            "revoked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("jti", name="pk_auth_revoked_tokens"),
    )


def downgrade() -> None:
    op.drop_table("auth_revoked_tokens")
    # Fails if two owners used the same request_id: that history cannot go back to one
    # global key without deciding which job keeps it.
    op.create_unique_constraint(OLD, TABLE, ["request_id"])
    op.drop_constraint(NEW, TABLE, type_="unique")
    op.drop_column(TABLE, "owner_subject")
