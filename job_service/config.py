"""Settings of the job-service, read from JOB_SERVICE_* environment variables.

Every variable has a default that works with `make run`'s stack; docs/reference.md lists them.
Built once in main() and passed in: nothing reads the environment at import time. The mechanism
is pydantic-settings, as in the worker's settings (analysis_worker.config): `Settings(**values)`
is the defaults plus `values` and reads no environment; `Settings.from_env()` reads the
JOB_SERVICE_* variables and its errors name the variable and value. Add a setting as
`name: type = default` at the end of the class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal, Self

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PREFIX = "JOB_SERVICE_"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable(s) to fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    #: SQLAlchemy URL of the job database (asyncpg driver).
    database_url: str = Field(
        default="postgresql+asyncpg://postgres@127.0.0.1:55432/jobs", repr=False
    )
    #: host:port the gRPC server listens on.
    grpc_address: str = "127.0.0.1:50051"
    #: host:port of the Prometheus /metrics endpoint; empty disables it.
    metrics_address: str = "127.0.0.1:9464"
    #: S3 endpoint the service itself talks to (empty: AWS).
    s3_endpoint_url: str = "http://127.0.0.1:8333"
    #: Endpoint written into presigned URLs, when clients reach S3 by another address.
    s3_public_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = "devaccess"
    s3_secret_access_key: str = Field(default="devsecret", repr=False)
    s3_bucket: str = "videos"
    s3_upload_prefix: str = "uploads/"
    s3_results_prefix: str = "results/"
    #: Connect/read timeout of one S3 call; a timeout answers UNAVAILABLE and changes nothing.
    s3_timeout_seconds: float = 5.0
    max_upload_bytes: PositiveInt = 5 * 1024**3
    upload_url_ttl_seconds: int = 3600
    #: Lease length; workers renew every heartbeat interval. A crashed worker's job is
    #: claimable again within lease + reaper interval.
    lease_seconds: PositiveFloat = 30.0
    heartbeat_interval_seconds: float = 10.0
    #: Hard cap on one stage (quick or deep pass) however often it is renewed.
    stage_timeout_seconds: float = 3600.0
    max_attempts: PositiveInt = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    claim_max_jobs: PositiveInt = 32
    #: Tenants get the fleet in proportion to their weights (fair key order); false: the
    #: oldest claimable job first, as before revision 0011 (docs/tenants.md).
    fair_claim: bool = True
    #: The dwell-time metric's tenant label: this many tenants by name, the rest "other".
    tenant_metric_labels: int = 20
    claim_max_wait_seconds: float = 20.0
    reaper_interval_seconds: float = 5.0
    #: Jobs in awaiting_upload this long are checked against S3 (clients that never call
    #: CompleteUpload); 0 disables the reconciler.
    reconcile_after_seconds: float = 120.0
    reconcile_interval_seconds: float = 30.0
    reconcile_batch: int = 100
    #: A job in awaiting_upload longer than this counts as stuck (metrics, GetStats).
    stuck_upload_seconds: int = 300
    db_pool_size: int = 10
    db_connect_timeout_seconds: float = 5.0
    log_level: str = "INFO"
    #: "json" or "text".
    log_format: str = "json"
    # --- edge helper: bounded resources, page tokens, retention (docs/decisions.md, edge) ---
    #: Unary calls in flight (parked ClaimJob included) above which new ones are refused with
    #: RESOURCE_EXHAUSTED; the lease-keeping calls (Heartbeat, ReportProgress, CompleteJob,
    #: FailJob, ReleaseJob) are never refused.
    max_concurrent_rpcs: PositiveInt = 10000
    #: WatchJob streams open at once; more are refused with RESOURCE_EXHAUSTED.
    max_watch_streams: PositiveInt = 1000
    #: A WatchJob stream ends (status OK) after this long; the client calls WatchJob again.
    watch_max_seconds: PositiveFloat = 300.0
    #: Connections of the pool WatchJob, AdminService and retention use, apart from the lease
    #: path's, so a flood of streams or operator reads cannot starve heartbeats.
    aux_db_pool_size: PositiveInt = 3
    #: Key that signs ListJobs page tokens; empty derives one from the database URL (every
    #: instance of a deployment then agrees). Set it when the URL is not secret.
    page_token_secret: str = Field(default="", repr=False)
    #: Finished jobs (done, failed) whose last change is older than this are deleted with their
    #: error rows by a background task; 0 keeps them forever (the default).
    retention_seconds: float = 0.0
    retention_interval_seconds: PositiveFloat = 600.0
    #: Jobs deleted per transaction (small: each batch holds its row locks only briefly).
    retention_batch: PositiveInt = 500
    #: The background task also deletes the purged jobs' results in S3 (PurgeJobs asks per call).
    retention_delete_results: bool = False
    # -- lease path (perf-core) --
    #: Infrastructure failures (FailJob kind=INFRASTRUCTURE) spend no attempt: requeued after a
    #: jittered backoff between the base and the cap, growing with how long the trouble lasts...
    infra_retry_base_seconds: float = 1.0
    infra_retry_max_seconds: float = 30.0
    #: ...until this long after the first infrastructure failure in a row; then FAILED with
    #: INFRASTRUCTURE_UNAVAILABLE.
    infra_retry_window_seconds: float = 21600.0
    #: After the database was unreachable (or the service started), expired leases are taken
    #: back only once it has been reachable this long; never less than one lease.
    outage_grace_seconds: float = 0.0
    #: Connections of the lease path's own pool (ClaimJob, Heartbeat, the fenced calls).
    lease_pool_size: int = 10
    #: lock_timeout / statement_timeout of the lease path: a call that would wait longer answers
    #: UNAVAILABLE instead.
    lease_lock_timeout_seconds: float = 2.0
    lease_statement_timeout_seconds: float = 10.0
    # Multipart uploads and checksums (upload helper, issue 9). Files above the threshold (or
    # above 5 GiB) go multipart; the part size is max(multipart_part_bytes, ceil(size/10000),
    # s3_min_part_bytes). max_upload_bytes may be raised up to S3's 5 TiB object limit.
    multipart_threshold_bytes: int = 64 * 1024**2
    multipart_part_bytes: int = 16 * 1024**2
    #: S3's minimum part size (5 MiB); only test backends (moto) may go lower.
    s3_min_part_bytes: int = 5 * 1024**2
    #: Most part numbers one SignUploadParts call signs.
    max_sign_parts: int = 1000
    #: Most upload-verification rows one job's error history keeps.
    max_upload_error_rows: int = 20
    #: Service processes sharing the gRPC port (SO_REUSEPORT), each a full instance (its own
    #: pools, LISTEN connection, reaper). With more than one, process k serves metrics on the
    #: metrics port + k.
    processes: PositiveInt = 1
    # -- security (issue 10; README "Security", docs/decisions.md) --
    #: Every RPC but grpc.health.v1 needs a caller with the right role. "false" lets anyone who
    #: reaches the port call everything (logged as a warning at start-up).
    auth_required: bool = True
    #: Tokens must carry this `iss` and this `aud`.
    auth_issuer: str = "job-service"
    auth_audience: str = "jobs.v1"
    #: The one algorithm accepted (pinned: a token saying otherwise is refused).
    auth_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    #: HS256 shared secrets, comma-separated `kid=secret` (or one bare secret). More than one is
    #: accepted at once (rotation); the first signs what `python -m job_service.auth mint` mints.
    auth_hs256_secrets: SecretStr = SecretStr("")
    #: A JWKS file (RSA/EC public keys, or "oct" secrets), each key with its `kid`; re-read
    #: when it changes. Either this or the secrets above.
    auth_jwks_file: str = ""
    #: PEM private key that `python -m job_service.auth mint` signs RS256/ES256 tokens with,
    #: and its `kid`. The service itself never needs it.
    auth_signing_key_file: str = ""
    auth_signing_kid: str = ""
    #: Clock skew allowed on exp/nbf.
    auth_leeway_seconds: float = 30.0
    #: How stale the in-memory copy of the revoked-token list may be.
    auth_revocation_refresh_seconds: PositiveFloat = 5.0
    #: The token claim holding the role (uploader, worker or operator).
    auth_role_claim: str = "role"
    #: Server reflection: "open" (anyone: make run), "authenticated" (any valid caller), "off".
    reflection: Literal["open", "authenticated", "off"] = "authenticated"
    #: TLS: certificate chain and key (PEM), re-read when they change or on SIGHUP.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Plaintext gRPC only when asked for (a warning is logged); without it a missing
    #: certificate stops the start.
    grpc_plaintext: bool = False
    #: mTLS: a CA bundle; when set, every client must present a certificate that chains to it
    #: (the handshake fails otherwise). Bearer tokens still work on top of it.
    tls_client_ca_file: str = ""
    #: The same as AUTH_HS256_SECRETS, read from a file (docker/Kubernetes secrets); one of the two.
    auth_hs256_secrets_file: str = ""
    #: Client certificate identities (common name or SAN) mapped to roles, comma-separated
    #: `identity=role`, e.g. `fleet-a.workers.internal=worker`.
    tls_client_roles: str = ""
    # -- several instances, balanced (docs/architecture.md) --
    #: Each client connection is sent GOAWAY after this long, so clients reconnect (and
    #: re-resolve a dns:/// target) and spread over the instances; 0 keeps connections forever.
    grpc_max_connection_age_seconds: float = Field(default=300.0, ge=0)
    #: How long calls in flight at that moment may still run on the old connection. Never less
    #: than the longest call, so a ClaimJob long poll or a WatchJob stream ends by itself (OK)
    #: rather than being cut; new calls (heartbeats) already go over a new connection.
    grpc_max_connection_age_grace_seconds: float = Field(default=330.0, ge=0)

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)

    # -- events and webhooks (docs/events.md) --
    #: Events older than this are deleted by the retention task; 0 keeps them forever. A purged
    #: job's events go with it whatever this says.
    events_retention_seconds: float = Field(default=30 * 86400.0, ge=0)
    #: This instance fans events out to webhook endpoints and delivers them (instances share
    #: the work with SKIP LOCKED); off: it only serves the API.
    webhook_delivery: bool = True
    #: A delivery succeeds on a 2xx answer within this time.
    webhook_timeout_seconds: PositiveFloat = 15.0
    #: Multiplies the Standard Webhooks retry schedule (5 s … 24 h); tests shrink it.
    webhook_retry_scale: PositiveFloat = 1.0
    #: An endpoint failing without a success for this long is disabled.
    webhook_disable_after_seconds: PositiveFloat = 5 * 86400.0
    #: Allow http:// endpoint URLs (https only otherwise).
    webhook_allow_http: bool = False
    #: Addresses or CIDR blocks (comma- or space-separated) that are allowed although loopback,
    #: private or link-local, e.g. "127.0.0.1" for a local receiver.
    webhook_allowed_addresses: str = ""
    #: After a rotation the old secret keeps signing this long (unless the call says otherwise).
    webhook_secret_overlap_seconds: PositiveFloat = 86400.0
    #: Deliveries in flight per instance, and per endpoint per instance.
    webhook_max_in_flight: PositiveInt = 64
    webhook_endpoint_in_flight: PositiveInt = 8

    @model_validator(mode="after")
    def _heartbeat_fits_the_lease(self) -> Self:
        if self.heartbeat_interval_seconds * 2 > self.lease_seconds:
            raise ValueError(
                "JOB_SERVICE_HEARTBEAT_INTERVAL_SECONDS must be at most half of "
                "JOB_SERVICE_LEASE_SECONDS, so one lost heartbeat does not lose the lease"
            )
        return self

    @model_validator(mode="after")
    def _connection_age_grace_covers_the_longest_call(self) -> Self:
        longest = max(self.claim_max_wait_seconds, self.watch_max_seconds)
        if (
            self.grpc_max_connection_age_seconds > 0
            and self.grpc_max_connection_age_grace_seconds < longest
        ):
            raise ValueError(
                "JOB_SERVICE_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS must be at least "
                "JOB_SERVICE_CLAIM_MAX_WAIT_SECONDS and JOB_SERVICE_WATCH_MAX_SECONDS "
                f"({longest:g}), so a long poll or a stream ends by itself when its connection "
                "is retired"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the constructor is given: the environment is read by from_env() alone.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Reads JOB_SERVICE_* from `environ` (default os.environ; names compare
        case-insensitively); raises SettingsError naming every bad variable."""
        env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
        values: dict[str, Any] = {
            n: env[PREFIX + n.upper()] for n in cls.model_fields if PREFIX + n.upper() in env
        }
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_explain(exc)) from None

    @classmethod
    def env_table(cls) -> list[tuple[str, str]]:
        """(variable, default) for every field; docs/reference.md and docker-compose are checked
        against it."""
        return [(PREFIX + n.upper(), str(f.default)) for n, f in cls.model_fields.items()]


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            problems.append(f"{PREFIX}{str(error['loc'][0]).upper()}={error['input']!r}: {message}")
        else:  # a rule across several fields: its message names them
            problems.append(message)
    return "; ".join(problems)
