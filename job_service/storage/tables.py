"""The schema as it stands at the newest migration. Alembic's `check` compares the migrated
database with this metadata, so the two cannot drift apart."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.dialects.postgresql.base import ischema_names as _pg_ischema_names
from sqlalchemy.types import UserDefinedType

from job_service.domain.status import JobStatus

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

job_status = Enum(
    JobStatus,
    name="video_analysis_job_status",
    values_callable=lambda e: [m.value for m in e],
    create_type=False,
)
session_status = Enum("pending", "uploaded", name="video_session_status", create_type=False)

sessions = Table(
    "video_sessions",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("status", session_status, nullable=False, server_default="pending"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

jobs = Table(
    "video_analysis_jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column(
        "session_id",
        UUID(as_uuid=True),
        ForeignKey("video_sessions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("status", job_status, nullable=False),
    Column("stage", Text, nullable=False),
    Column("progress_pct", Integer, nullable=False, server_default="0"),
    Column("filename", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("s3_bucket", Text, nullable=False),
    Column("s3_key", Text, nullable=False),
    Column("error_code", Text),
    Column("error_message", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Added with the verified-upload lifecycle and the lease model (revision 0003).
    # Unique per owner_subject since revision 0009 (see the constraint at the end).
    Column("request_id", UUID(as_uuid=True)),
    Column("upload_expires_at", DateTime(timezone=True)),
    Column("observed_size", BigInteger),
    Column("etag", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="5"),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("lease_token", UUID(as_uuid=True)),
    Column("last_lease_token", UUID(as_uuid=True)),
    Column("last_lease_outcome", Text),
    Column("leased_by", Text),
    Column("leased_at", DateTime(timezone=True)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("stage_started_at", DateTime(timezone=True)),
    Column("cancel_requested", Boolean, nullable=False, server_default="false"),
    Column("error_retryable", Boolean, nullable=False, server_default="false"),
    Column("error_attempt", Integer, nullable=False, server_default="0"),
    Column("error_at", DateTime(timezone=True)),
    Column("result", JSONB),
    Column("results_uri", Text),
    # When the upload reconciler last looked for this job's object (revision 0005).
    Column("upload_checked_at", DateTime(timezone=True)),
    # Revision 0006 (lease path): the infrastructure retry window counts from here; the stored
    # error was infrastructure trouble (spent no attempt).
    Column("infrastructure_failing_since", DateTime(timezone=True)),
    Column("error_infrastructure", Boolean, nullable=False, server_default="false"),
    # Multipart uploads and checksums (revision 0007): the declared whole-file SHA-256, the S3
    # multipart upload, and the checksum S3 reported when the upload was verified.
    Column("sha256", LargeBinary),
    Column("upload_id", Text),
    Column("part_size", BigInteger),
    Column("part_count", Integer),
    Column("checksum_sha256", Text),
    # Revision 0009 (security): who created the job; request_id is an idempotency key per owner.
    Column("owner_subject", Text, nullable=False, server_default=""),
    # Revision 0011 (tenants): the fair-share tenant, the priority within it, the fair key the
    # claim orders by (stamped by a trigger when the job becomes queued), and the dwell time's
    # two ends.
    Column("tenant", Text, nullable=False, server_default=""),
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    Column("fair_key", Float(precision=53)),
    Column("fair_rank", Float(precision=53)),  # the key before the clamp to the head
    Column("queued_at", DateTime(timezone=True)),
    Column("first_claimed_at", DateTime(timezone=True)),
    UniqueConstraint("owner_subject", "request_id", name="uq_video_analysis_jobs_owner_request"),
    # The claim's scan: only claimable rows are in it, so it stays small as history grows.
    Index(
        "ix_video_analysis_jobs_claimable",
        "available_at",
        "created_at",
        postgresql_where=text("status IN ('queued', 'quick_done') AND lease_token IS NULL"),
    ),
    # The fair claim's scan (revision 0011): the same rows, in fair-key order.
    Index(
        "ix_video_analysis_jobs_fair",
        "fair_key",
        "fair_rank",
        postgresql_where=text("status IN ('queued', 'quick_done') AND lease_token IS NULL"),
    ),
    # Quota use per owner: its jobs not yet terminal (revision 0011).
    Index(
        "ix_video_analysis_jobs_live_owner",
        "owner_subject",
        postgresql_where=text("status NOT IN ('done', 'failed')"),
    ),
    Index("ix_video_analysis_jobs_first_claimed_at", "first_claimed_at"),
    # The reaper's scan over live leases. Not on lease_expires_at, the one column a heartbeat
    # writes, so heartbeats are HOT updates (revision 0006; the table has fillfactor 80).
    Index(
        "ix_video_analysis_jobs_leased",
        "leased_at",
        postgresql_where=text("lease_token IS NOT NULL"),
    ),
    Index("ix_video_analysis_jobs_status_updated_at", "status", "updated_at"),
    Index(
        "ix_video_analysis_jobs_awaiting_upload",
        "created_at",
        postgresql_where=text("status = 'awaiting_upload'"),
    ),
    # The retention purge's scan over finished jobs, oldest change first (revision 0008).
    Index(
        "ix_video_analysis_jobs_finished",
        "updated_at",
        postgresql_where=text("status IN ('done', 'failed')"),
    ),
)

job_errors = Table(
    "video_analysis_job_errors",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column(
        "job_id",
        UUID(as_uuid=True),
        ForeignKey("video_analysis_jobs.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("attempt", Integer, nullable=False),
    Column("code", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("retryable", Boolean, nullable=False),
    Column("worker_id", Text),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Revision 0006: infrastructure trouble, not the job's own failure.
    Column("infrastructure", Boolean, nullable=False, server_default="false"),
)

# The SHA-256 each multipart part's URL was signed with (revision 0007).
upload_parts = Table(
    "video_upload_parts",
    metadata,
    Column(
        "job_id",
        UUID(as_uuid=True),
        ForeignKey("video_analysis_jobs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("part_number", Integer, nullable=False),
    Column("sha256", LargeBinary, nullable=False),
    Column("signed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("job_id", "part_number"),
)

# Revision 0006 (lease path): jobs some WatchJob stream is watching, per service instance. The
# change NOTIFY is sent only for these (a NOTIFY serialises commits); rows of an instance that
# died expire.
job_watches = Table(
    "video_analysis_job_watches",
    metadata,
    Column("job_id", UUID(as_uuid=True), primary_key=True),
    Column("instance_id", UUID(as_uuid=True), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# Revision 0009 (security): revoked bearer tokens by `jti`; rows past the token's expiry can go.
revoked_tokens = Table(
    "auth_revoked_tokens",
    metadata,
    Column("jti", Text, primary_key=True),
    Column("subject", Text, nullable=False, server_default=""),
    Column("reason", Text, nullable=False, server_default=""),
    Column("revoked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True)),
)

# Revision 0011 (tenants): operators' weights and quotas per tenant (NULL: no limit), the
# InitiateUpload rate window, and the last fair key the tenant was given.
tenants = Table(
    "job_tenants",
    metadata,
    Column("name", Text, primary_key=True),
    Column("owner_subject", Text, nullable=False, server_default=""),
    Column("weight", Integer, nullable=False, server_default="1"),
    Column("max_live_jobs", BigInteger),
    Column("max_pending_bytes", BigInteger),
    Column("max_initiates_per_minute", Integer),
    Column("rate_window_start", DateTime(timezone=True)),
    Column("rate_window_count", Integer, nullable=False, server_default="0"),
    Column("last_key", Float(precision=53), nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("weight BETWEEN 1 AND 1000", name="ck_job_tenants_weight"),
)

#: NOTIFY channel: a row became claimable (payload: job id), or will at a time (payload
#: `at:<epoch seconds>`, a backoff). See revisions 0003 and 0006.
CLAIMABLE_CHANNEL = "video_analysis_jobs_claimable"
#: NOTIFY channel: a job's status or progress changed (payload: job id). See revision 0004.
CHANGED_CHANNEL = "video_analysis_jobs_changed"


class XID8(UserDefinedType[int]):
    """Postgres `xid8`: a 64-bit transaction id (the event cursor's first half)."""

    cache_ok = True

    def get_col_spec(self, **_kw: object) -> str:
        return "XID8"


# Revision 0010 (events and webhooks): the transactional outbox, written by a trigger on jobs.
job_events = Table(
    "job_events",
    metadata,
    Column("xid", XID8(), nullable=False, server_default=text("pg_current_xact_id()")),
    Column("seq", BigInteger, Identity(always=True), nullable=False),
    Column("id", UUID(as_uuid=True), nullable=False, server_default=text("gen_random_uuid()")),
    Column("type", Text, nullable=False),
    Column(
        "job_id",
        UUID(as_uuid=True),
        ForeignKey("video_analysis_jobs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("owner_subject", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("payload", JSONB, nullable=False),
    PrimaryKeyConstraint("xid", "seq"),
    UniqueConstraint("id", name="uq_job_events_id"),
    Index("ix_job_events_owner_subject", "owner_subject", "xid", "seq"),
    Index("ix_job_events_job_id", "job_id"),
)

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("subject", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("types", ARRAY(Text), nullable=False, server_default="{}"),
    Column("secret", Text, nullable=False),
    Column("old_secret", Text),
    Column("old_secret_until", DateTime(timezone=True)),
    Column("enabled", Boolean, nullable=False, server_default="true"),
    Column("disabled_reason", Text),
    Column("disabled_at", DateTime(timezone=True)),
    Column("failing_since", DateTime(timezone=True)),
    Column("fanout_xid", XID8(), nullable=False),
    Column("fanout_seq", BigInteger, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column(
        "endpoint_id",
        UUID(as_uuid=True),
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "event_id",
        UUID(as_uuid=True),
        ForeignKey("job_events.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("xid", XID8(), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("job_id", UUID(as_uuid=True), nullable=False),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("leased_until", DateTime(timezone=True)),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    PrimaryKeyConstraint("endpoint_id", "event_id"),
    Index(
        "ix_webhook_deliveries_pending",
        "endpoint_id",
        "xid",
        "seq",
        postgresql_where=text("state = 'pending'"),
    ),
    Index(
        "ix_webhook_deliveries_job",
        "endpoint_id",
        "job_id",
        "xid",
        "seq",
        postgresql_where=text("state = 'pending'"),
    ),
)

#: NOTIFY channel: a job event was written (revision 0010; empty payload).
EVENTS_CHANNEL = "job_events"

# Reflection (alembic check) knows the type by name.
_pg_ischema_names["xid8"] = XID8
