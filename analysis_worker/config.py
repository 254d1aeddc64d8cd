"""The worker's settings, read once from ANALYSIS_WORKER_* environment variables in main().

One frozen object instead of scattered `os.environ` reads, so every knob is documented in one
table (`env_table()`, which docker-compose and docs/reference.md are checked against) and tests
build their own settings from a plain mapping.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from analysis_worker.analysis.base import DEFAULT_ANALYZER_SPEC

PREFIX = "ANALYSIS_WORKER_"

# ClaimJobRequest.worker_id is at most 200 characters (jobs.proto).
_MAX_WORKER_ID = 200
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_NonEmpty = Annotated[str, Field(min_length=1)]


@dataclass(frozen=True)
class HostPort:
    """An address to bind or dial; kept split so nobody re-parses "host:port" strings."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the variable(s) to fix."""


class Settings(BaseSettings):
    """Everything main() needs to build the worker. Durations are in seconds.

    An empty WORKER_ID means "derive hostname-pid", an empty S3_ENDPOINT_URL "AWS", an empty
    WORK_DIR the system temp dir, an empty METRICS_ADDRESS "no metrics endpoint".
    """

    # pydantic-settings, as the job-service's settings; the two share no code (the worker shares
    # only the generated protos with the job-service), so these few lines stand in both.
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        str_strip_whitespace=True,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    job_service_address: _NonEmpty = "127.0.0.1:50051"
    worker_id: Annotated[str, Field(max_length=_MAX_WORKER_ID)] = ""
    concurrency: Annotated[int, Field(ge=1)] = 2
    claim_wait_seconds: _Seconds = 20
    rpc_timeout_seconds: _PositiveSeconds = 10
    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    s3_region: _NonEmpty = "us-east-1"
    s3_access_key_id: str = "devaccess"
    s3_secret_access_key: str = Field(default="devsecret", repr=False)
    analyzer: str = DEFAULT_ANALYZER_SPEC
    work_dir: Path | None = None
    shutdown_grace_seconds: _Seconds = 30
    metrics_address: Annotated[HostPort | None, NoDecode] = HostPort("127.0.0.1", 9465)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # worker (issue 7): seconds of S3 trouble (5xx, timeouts, refused connections, 403) one
    # lease retries inside itself before it gives the job back as infrastructure trouble.
    s3_retry_budget_seconds: _Seconds = 60
    # -- security (issue 10; README "Security") --
    #: Bearer token (role worker) sent on every call, or a file holding it (re-read when it
    #: changes, so a rotated token needs no restart).
    token: SecretStr = SecretStr("")
    token_file: str = ""
    #: TLS to the job-service: the CA bundle that signed its certificate (empty: the system's
    #: roots), and a client certificate + key for mTLS.
    tls_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    #: Plaintext gRPC only when asked for (a warning is logged).
    plaintext: bool = False
    #: The only places a lease may point at: the source object must be in this bucket under the
    #: upload prefix, the results prefix under the results prefix. Anything else is refused
    #: with FailJob(LEASE_OUT_OF_BOUNDS) and never read or written.
    s3_bucket: str = "videos"
    s3_upload_prefix: str = "uploads/"
    s3_results_prefix: str = "results/"

    @field_validator("worker_id")
    @classmethod
    def _derive_worker_id(cls, value: str) -> str:
        return value or f"{socket.gethostname()}-{os.getpid()}"

    @field_validator("s3_endpoint_url", "work_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("analyzer")
    @classmethod
    def _import_spec(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not (sep and module and attr):
            raise ValueError("must look like 'package.module:ClassName'")
        return value

    @field_validator("metrics_address", mode="before")
    @classmethod
    def _host_port(cls, value: Any) -> Any:
        return _optional_host_port(value) if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `Settings(**values)` is the defaults plus `values`; only from_env() reads variables.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Reads ANALYSIS_WORKER_* from `environ` (default os.environ, names compared
        case-insensitively); SettingsError names every bad variable and its value."""
        env = {k.upper(): v for k, v in (os.environ if environ is None else environ).items()}
        given: dict[str, Any] = {
            n: env[PREFIX + n.upper()] for n in cls.model_fields if PREFIX + n.upper() in env
        }
        try:
            return cls(**given)
        except ValidationError as exc:
            problems = [
                f"{PREFIX}{str(e['loc'][0]).upper()}={e['input']!r}: "
                + str(e["msg"]).removeprefix("Value error, ")
                if e["loc"]
                else str(e["msg"])
                for e in exc.errors(include_url=False)
            ]
            raise SettingsError("; ".join(problems)) from None

    @classmethod
    def env_table(cls) -> list[tuple[str, str]]:
        """Every variable, with its default as written in the environment, in field order."""
        return [
            (PREFIX + name.upper(), "" if field.default is None else str(field.default))
            for name, field in cls.model_fields.items()
        ]


def env_table() -> list[tuple[str, str]]:
    """Every variable the worker reads, with its default, in a stable order."""
    return Settings.env_table()


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
