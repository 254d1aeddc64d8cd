"""The worker's settings, read once from ANALYSIS_WORKER_* environment variables in main().

One frozen object instead of scattered `os.environ` reads, so every knob is documented in one
table (`env_table()`, which docker-compose and the README are checked against) and tests build
their own settings from a plain mapping.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from analysis_worker.analysis.base import DEFAULT_ANALYZER_SPEC

PREFIX = "ANALYSIS_WORKER_"

# (name without prefix, default). An empty default for WORKER_ID means "derive hostname-pid";
# an empty S3_ENDPOINT_URL means "AWS", empty WORK_DIR the system temp dir, empty
# METRICS_ADDRESS "no metrics endpoint".
_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("JOB_SERVICE_ADDRESS", "127.0.0.1:50051"),
    ("WORKER_ID", ""),
    ("CONCURRENCY", "2"),
    ("CLAIM_WAIT_SECONDS", "20"),
    ("RPC_TIMEOUT_SECONDS", "10"),
    ("S3_ENDPOINT_URL", "http://127.0.0.1:8333"),
    ("S3_REGION", "us-east-1"),
    ("S3_ACCESS_KEY_ID", "devaccess"),
    ("S3_SECRET_ACCESS_KEY", "devsecret"),
    ("ANALYZER", DEFAULT_ANALYZER_SPEC),
    ("WORK_DIR", ""),
    ("SHUTDOWN_GRACE_SECONDS", "30"),
    ("METRICS_ADDRESS", "127.0.0.1:9465"),
    ("LOG_LEVEL", "INFO"),
    ("LOG_FORMAT", "json"),
    # worker (issue 7): seconds of S3 trouble one lease retries before giving the job back.
    ("S3_RETRY_BUDGET_SECONDS", "60"),
)

# ClaimJobRequest.worker_id is at most 200 characters (jobs.proto).
_MAX_WORKER_ID = 200
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

T = TypeVar("T")


def env_table() -> list[tuple[str, str]]:
    """Every variable the worker reads, with its default, in a stable order."""
    return [(PREFIX + name, default) for name, default in _DEFAULTS]


@dataclass(frozen=True)
class HostPort:
    """An address to bind or dial; kept split so nobody re-parses "host:port" strings."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything main() needs to build the worker. Durations are in seconds."""

    job_service_address: str
    worker_id: str
    concurrency: int
    claim_wait_seconds: float
    rpc_timeout_seconds: float
    s3_endpoint_url: str | None
    s3_region: str
    s3_access_key_id: str
    s3_secret_access_key: str = field(repr=False)
    analyzer: str = DEFAULT_ANALYZER_SPEC
    work_dir: Path | None = None
    shutdown_grace_seconds: float = 30.0
    metrics_address: HostPort | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # worker (issue 7): seconds of S3 trouble (5xx, timeouts, refused connections, 403) one
    # lease retries inside itself before it gives the job back as infrastructure trouble.
    s3_retry_budget_seconds: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings; raises ValueError naming the variable when a value is bad."""
        env = os.environ if environ is None else environ
        defaults = dict(_DEFAULTS)

        def raw(name: str) -> str:
            return env.get(PREFIX + name, defaults[name]).strip()

        def parsed(name: str, parse: Callable[[str], T]) -> T:
            value = raw(name)
            try:
                return parse(value)
            except ValueError as exc:
                raise ValueError(f"{PREFIX}{name}={value!r}: {exc}") from None

        address = parsed("JOB_SERVICE_ADDRESS", _non_empty)
        worker_id = parsed("WORKER_ID", _worker_id)
        return cls(
            job_service_address=address,
            worker_id=worker_id or f"{socket.gethostname()}-{os.getpid()}",
            concurrency=parsed("CONCURRENCY", _positive_int),
            claim_wait_seconds=parsed("CLAIM_WAIT_SECONDS", _non_negative_float),
            rpc_timeout_seconds=parsed("RPC_TIMEOUT_SECONDS", _positive_float),
            s3_endpoint_url=raw("S3_ENDPOINT_URL") or None,
            s3_region=parsed("S3_REGION", _non_empty),
            s3_access_key_id=raw("S3_ACCESS_KEY_ID"),
            s3_secret_access_key=raw("S3_SECRET_ACCESS_KEY"),
            analyzer=parsed("ANALYZER", _import_spec),
            work_dir=Path(raw("WORK_DIR")) if raw("WORK_DIR") else None,
            shutdown_grace_seconds=parsed("SHUTDOWN_GRACE_SECONDS", _non_negative_float),
            metrics_address=parsed("METRICS_ADDRESS", _optional_host_port),
            log_level=parsed("LOG_LEVEL", _log_level),
            log_format=parsed("LOG_FORMAT", _log_format),
            s3_retry_budget_seconds=parsed("S3_RETRY_BUDGET_SECONDS", _non_negative_float),
        )


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _worker_id(value: str) -> str:
    if len(value) > _MAX_WORKER_ID:
        raise ValueError(f"at most {_MAX_WORKER_ID} characters")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("must be an integer") from None
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError("must be finite")
    return number


def _non_negative_float(value: str) -> float:
    number = _float(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _positive_float(value: str) -> float:
    number = _float(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def _import_spec(value: str) -> str:
    module, sep, attr = value.partition(":")
    if not (sep and module and attr):
        raise ValueError("must look like 'package.module:ClassName'")
    return value


def _optional_host_port(value: str) -> HostPort | None:
    if not value:
        return None
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("must look like 'host:port'")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError("port must be an integer") from None
    if not 0 <= port <= 65535:
        raise ValueError("port must be in 0..65535")
    return HostPort(host.strip("[]"), port)


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


def _log_format(value: str) -> Literal["json", "text"]:
    if value == "json":
        return "json"
    if value == "text":
        return "text"
    raise ValueError("must be 'json' or 'text'")
