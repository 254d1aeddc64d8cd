"""Settings of the job-service, read from JOB_SERVICE_* environment variables.

Every variable has a default that works with `make run`'s local stack; the README lists them.
Built once in main() and passed in: nothing reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

PREFIX = "JOB_SERVICE_"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    #: SQLAlchemy URL of the job database (asyncpg driver).
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/jobs"
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
    s3_secret_access_key: str = "devsecret"
    s3_bucket: str = "videos"
    s3_upload_prefix: str = "uploads/"
    s3_results_prefix: str = "results/"
    #: Connect/read timeout of one S3 call; a timeout answers UNAVAILABLE and changes nothing.
    s3_timeout_seconds: float = 5.0
    max_upload_bytes: int = 5 * 1024**3
    upload_url_ttl_seconds: int = 3600
    #: Lease length; workers renew every heartbeat interval. A crashed worker's job is
    #: claimable again within lease + reaper interval.
    lease_seconds: float = 30.0
    heartbeat_interval_seconds: float = 10.0
    #: Hard cap on one stage (quick or deep pass) however often it is renewed.
    stage_timeout_seconds: float = 3600.0
    max_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    claim_max_jobs: int = 32
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

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(PREFIX + field.name.upper())
            if raw is None:
                continue
            kind: Any = type(field.default)
            try:
                values[field.name] = kind(raw) if kind is not str else raw
            except ValueError:
                raise ValueError(
                    f"{PREFIX}{field.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.heartbeat_interval_seconds * 2 > self.lease_seconds:
            raise ValueError(
                "JOB_SERVICE_HEARTBEAT_INTERVAL_SECONDS must be at most half of "
                "JOB_SERVICE_LEASE_SECONDS, so one lost heartbeat does not lose the lease"
            )
        for name in ("lease_seconds", "max_attempts", "claim_max_jobs", "max_upload_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{PREFIX}{name.upper()} must be > 0")

    @classmethod
    def env_table(cls) -> list[tuple[str, str]]:
        """(variable, default) pairs; the README table and docker-compose are checked against it."""
        return [(PREFIX + f.name.upper(), str(f.default)) for f in dataclasses.fields(cls)]
