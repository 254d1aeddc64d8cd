"""Events and webhooks: the transactional outbox of job events, webhook endpoints and
their deliveries.

- `job_events` is written by a row trigger on `video_analysis_jobs`, so every path that changes a
  status (SQLAlchemy use cases and the lease path's asyncpg statements alike) writes its event in
  the same transaction, by construction. The trigger fires only when the status changes into
  queued (from awaiting_upload or failed), done or failed; progress reports, heartbeats and
  lease-ending requeues write nothing. An operator's requeue is told apart by the
  transaction-local setting `jobs.event_reason` (job_service.storage.events.mark_requeue).
- The cursor is (xid, seq): `xid` is the writing transaction's id (`pg_current_xact_id()`), and
  readers only read rows whose transaction is older than every transaction still running
  (`xid < pg_snapshot_xmin(pg_current_snapshot())`), so a row that commits late can never be
  behind a cursor already handed out (docs/decisions.md, "Events and webhooks").
- A NOTIFY on `job_events` wakes the feed streams and the webhook fan-out.
- Deleting a job (PurgeJobs, retention) deletes its events and their deliveries (cascade).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

T = "video_analysis_jobs"

_FUNCTION = """
CREATE FUNCTION video_analysis_jobs_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kind text;
BEGIN
    IF NEW.status = 'done' THEN
        kind := 'job.done';
    ELSIF NEW.status = 'failed' THEN
        IF NEW.error_code = 'CANCELLED' THEN
            kind := 'job.cancelled';
        ELSIF NEW.error_code LIKE 'UPLOAD\\_%' THEN
            kind := 'job.upload_failed';
        ELSE
            kind := 'job.failed';
        END IF;
    ELSIF NEW.status = 'queued' THEN
        IF current_setting('jobs.event_reason', true) = 'requeue' THEN
            kind := 'job.requeued';
        ELSE
            kind := 'job.queued';
        END IF;
    ELSE
        RETURN NULL;
    END IF;
    INSERT INTO job_events (type, job_id, owner_subject, payload)
    VALUES (kind, NEW.id, NEW.owner_subject, to_jsonb(NEW));
    PERFORM pg_notify('job_events', '');
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE job_events (
            xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            seq bigint GENERATED ALWAYS AS IDENTITY,
            id uuid NOT NULL DEFAULT gen_random_uuid(),
            type text NOT NULL,
            job_id uuid NOT NULL,
            owner_subject text NOT NULL,
            occurred_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb NOT NULL,
            CONSTRAINT pk_job_events PRIMARY KEY (xid, seq),
            CONSTRAINT uq_job_events_id UNIQUE (id),
            CONSTRAINT fk_job_events_job_id_video_analysis_jobs FOREIGN KEY (job_id)
                REFERENCES video_analysis_jobs (id) ON DELETE CASCADE
        )
        """
    )
    op.execute("CREATE INDEX ix_job_events_owner_subject ON job_events (owner_subject, xid, seq)")
    op.execute("CREATE INDEX ix_job_events_job_id ON job_events (job_id)")
    op.execute(_FUNCTION)
    op.execute(
        f"""
        CREATE TRIGGER video_analysis_jobs_event_insert
        AFTER INSERT ON {T}
        FOR EACH ROW
        WHEN (NEW.status IN ('queued', 'done', 'failed'))
        EXECUTE FUNCTION video_analysis_jobs_event()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER video_analysis_jobs_event_update
        AFTER UPDATE OF status ON {T}
        FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status
              AND (NEW.status IN ('done', 'failed')
                   OR (NEW.status = 'queued' AND OLD.status IN ('awaiting_upload', 'failed'))))
        EXECUTE FUNCTION video_analysis_jobs_event()
        """
    )
    op.execute(
        """
        CREATE TABLE webhook_endpoints (
            id uuid PRIMARY KEY,
            subject text NOT NULL,
            url text NOT NULL,
            types text[] NOT NULL DEFAULT '{}',
            secret text NOT NULL,
            old_secret text,
            old_secret_until timestamptz,
            enabled boolean NOT NULL DEFAULT true,
            disabled_reason text,
            disabled_at timestamptz,
            failing_since timestamptz,
            fanout_xid xid8 NOT NULL,
            fanout_seq bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE webhook_deliveries (
            endpoint_id uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
            event_id uuid NOT NULL REFERENCES job_events (id) ON DELETE CASCADE,
            xid xid8 NOT NULL,
            seq bigint NOT NULL,
            job_id uuid NOT NULL,
            state text NOT NULL DEFAULT 'pending',
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            leased_until timestamptz,
            last_status integer,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            delivered_at timestamptz,
            CONSTRAINT pk_webhook_deliveries PRIMARY KEY (endpoint_id, event_id)
        )
        """
    )
    op.execute(
        "CREATE INDEX ix_webhook_deliveries_pending ON webhook_deliveries "
        "(endpoint_id, xid, seq) WHERE state = 'pending'"
    )
    op.execute(
        "CREATE INDEX ix_webhook_deliveries_job ON webhook_deliveries "
        "(endpoint_id, job_id, xid, seq) WHERE state = 'pending'"
    )
    op.execute("CREATE INDEX ix_webhook_deliveries_event_id ON webhook_deliveries (event_id)")


def downgrade() -> None:
    op.execute("DROP TABLE webhook_deliveries")
    op.execute("DROP TABLE webhook_endpoints")
    op.execute(f"DROP TRIGGER video_analysis_jobs_event_update ON {T}")
    op.execute(f"DROP TRIGGER video_analysis_jobs_event_insert ON {T}")
    op.execute("DROP FUNCTION video_analysis_jobs_event()")
    op.execute("DROP TABLE job_events")
