"""Tenants, fair shares, priorities and quotas.

A job belongs to a tenant (its owner subject, or `owner/sub-tenant`) and carries a priority
and a fair key. The fair claim orders by the key (Start-time Fair Queueing, see
docs/decisions.md "Tenants and fair shares"); the key is stamped by a trigger when a job
becomes queued, whatever path queues it, so the claim stays one index scan. `job_tenants`
holds the operators' weights and quotas and each tenant's last key.

Existing jobs keep their FIFO order: the live ones are numbered by (available_at,
created_at) as their keys, and every existing owner gets a tenant row whose last key is the
newest number. Terminal jobs keep no key.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLE = "video_analysis_jobs"
CLAIMABLE = "status IN ('queued', 'quick_done') AND lease_token IS NULL"
LIVE = "status NOT IN ('done', 'failed')"

# One priority step is worth this many of the tenant's own jobs (domain/tenancy.py says the
# same; the migration test checks they agree).
PRIORITY_STEP = 2

FAIR_KEY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION video_analysis_jobs_fair_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    head double precision;
    k double precision;
    w integer;
BEGIN
    -- The virtual time now: the smallest key still waiting (one look in the fair index), or,
    -- with nothing waiting, the newest key handed out.
    SELECT min(fair_key) INTO head FROM {TABLE} WHERE {CLAIMABLE};
    IF head IS NULL THEN
        SELECT max(last_key) INTO head FROM job_tenants;
    END IF;
    head := coalesce(head, 0);
    -- The tenant's row lock serialises only this tenant's enqueues.
    INSERT INTO job_tenants AS t (name, owner_subject, last_key)
    VALUES (NEW.tenant, NEW.owner_subject, head + 1)
    ON CONFLICT (name) DO UPDATE
        SET last_key = greatest(t.last_key, head) + 1.0 / t.weight, updated_at = now()
    RETURNING t.last_key, t.weight INTO k, w;
    -- Priority: a head start of {PRIORITY_STEP} of the tenant's own jobs per step, never
    -- ahead of the head (so never more than the tenant's share); jobs clamped to the head
    -- keep their order by the unclamped key (fair_rank).
    NEW.fair_rank := k - NEW.priority * {PRIORITY_STEP}.0 / w;
    NEW.fair_key := greatest(head, NEW.fair_rank);
    NEW.queued_at := now();
    RETURN NEW;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        "job_tenants",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("owner_subject", sa.Text(), nullable=False, server_default=""),
        sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("max_live_jobs", sa.BigInteger()),
        sa.Column("max_pending_bytes", sa.BigInteger()),
        sa.Column("max_initiates_per_minute", sa.Integer()),
        sa.Column("rate_window_start", sa.DateTime(timezone=True)),
        sa.Column("rate_window_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_key", sa.Float(precision=53), nullable=False, server_default="0"),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("name", name="pk_job_tenants"),
        sa.CheckConstraint("weight BETWEEN 1 AND 1000", name="ck_job_tenants_weight"),
    )
    op.add_column(TABLE, sa.Column("tenant", sa.Text(), nullable=False, server_default=""))
    op.add_column(
        TABLE, sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0")
    )
    op.add_column(TABLE, sa.Column("fair_key", sa.Float(precision=53)))
    op.add_column(TABLE, sa.Column("fair_rank", sa.Float(precision=53)))
    op.add_column(TABLE, sa.Column("queued_at", sa.DateTime(timezone=True)))
    op.add_column(TABLE, sa.Column("first_claimed_at", sa.DateTime(timezone=True)))
    # Existing jobs: tenant = owner, keys in today's FIFO order.
    op.execute(f"UPDATE {TABLE} SET tenant = owner_subject WHERE owner_subject <> ''")
    op.execute(
        f"""
        UPDATE {TABLE} j SET fair_key = o.n, fair_rank = o.n, queued_at = j.available_at
        FROM (SELECT id, row_number() OVER (ORDER BY available_at, created_at) AS n
              FROM {TABLE} WHERE {LIVE} AND status <> 'awaiting_upload') o
        WHERE j.id = o.id
        """
    )
    op.execute(
        f"""
        INSERT INTO job_tenants (name, owner_subject, last_key)
        SELECT tenant, min(owner_subject), coalesce(max(fair_key), 0) FROM {TABLE}
        GROUP BY tenant
        """
    )
    op.create_index(
        "ix_video_analysis_jobs_fair",
        TABLE,
        ["fair_key", "fair_rank"],
        postgresql_where=sa.text(CLAIMABLE),
    )
    op.create_index(
        "ix_video_analysis_jobs_live_owner",
        TABLE,
        ["owner_subject"],
        postgresql_where=sa.text(LIVE),
    )
    op.create_index(
        "ix_video_analysis_jobs_first_claimed_at",
        TABLE,
        ["first_claimed_at"],
    )
    op.execute(FAIR_KEY_FUNCTION)
    op.execute(
        f"""
        CREATE TRIGGER video_analysis_jobs_queued_key BEFORE UPDATE OF status ON {TABLE}
        FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status IN ('awaiting_upload', 'failed'))
        EXECUTE FUNCTION video_analysis_jobs_fair_key()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER video_analysis_jobs_inserted_key BEFORE INSERT ON {TABLE}
        FOR EACH ROW WHEN (NEW.status = 'queued' AND NEW.fair_key IS NULL)
        EXECUTE FUNCTION video_analysis_jobs_fair_key()
        """
    )


def downgrade() -> None:
    op.execute(f"DROP TRIGGER video_analysis_jobs_inserted_key ON {TABLE}")
    op.execute(f"DROP TRIGGER video_analysis_jobs_queued_key ON {TABLE}")
    op.execute("DROP FUNCTION video_analysis_jobs_fair_key()")
    op.drop_index("ix_video_analysis_jobs_first_claimed_at", TABLE)
    op.drop_index("ix_video_analysis_jobs_live_owner", TABLE)
    op.drop_index("ix_video_analysis_jobs_fair", TABLE)
    for column in ("first_claimed_at", "queued_at", "fair_rank", "fair_key", "priority", "tenant"):
        op.drop_column(TABLE, column)
    op.drop_table("job_tenants")
