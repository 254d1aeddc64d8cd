"""Settings.from_env: defaults, overrides, and errors that name the variable to fix."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from analysis_worker.analysis import DEFAULT_ANALYZER_SPEC
from analysis_worker.config import PREFIX, HostPort, Settings, env_table


def env(**values: str) -> dict[str, str]:
    return {PREFIX + name: value for name, value in values.items()}


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.job_service_address == "127.0.0.1:50051"
    assert s.worker_id == f"{socket.gethostname()}-{os.getpid()}"
    assert s.concurrency == 2
    assert s.claim_wait_seconds == 20
    assert s.rpc_timeout_seconds == 10
    assert s.s3_endpoint_url == "http://127.0.0.1:8333"
    assert s.s3_region == "us-east-1"
    assert (s.s3_access_key_id, s.s3_secret_access_key) == ("devaccess", "devsecret")
    assert s.analyzer == DEFAULT_ANALYZER_SPEC
    assert s.work_dir is None
    assert s.shutdown_grace_seconds == 30
    assert s.metrics_address == HostPort("127.0.0.1", 9465)
    assert (s.log_level, s.log_format) == ("INFO", "json")
    assert s.s3_retry_budget_seconds == 60


def test_overrides() -> None:
    s = Settings.from_env(
        env(
            JOB_SERVICE_ADDRESS="jobs:6000",
            WORKER_ID="w-7",
            CONCURRENCY="8",
            CLAIM_WAIT_SECONDS="0",
            RPC_TIMEOUT_SECONDS="2.5",
            S3_ENDPOINT_URL="",
            S3_REGION="eu-west-1",
            ANALYZER="pkg.mod:Thing",
            WORK_DIR="/scratch",
            SHUTDOWN_GRACE_SECONDS="0",
            METRICS_ADDRESS="",
            LOG_LEVEL="debug",
            LOG_FORMAT="text",
            S3_RETRY_BUDGET_SECONDS="0",
        )
    )
    assert s.job_service_address == "jobs:6000"
    assert s.worker_id == "w-7"
    assert s.concurrency == 8
    assert s.claim_wait_seconds == 0
    assert s.rpc_timeout_seconds == 2.5
    assert s.s3_endpoint_url is None  # empty: AWS itself
    assert s.s3_region == "eu-west-1"
    assert s.analyzer == "pkg.mod:Thing"
    assert s.work_dir == Path("/scratch")
    assert s.shutdown_grace_seconds == 0
    assert s.metrics_address is None  # empty: no endpoint
    assert (s.log_level, s.log_format) == ("DEBUG", "text")
    assert s.s3_retry_budget_seconds == 0  # give the job back at the first S3 failure


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONCURRENCY", "0"),
        ("CONCURRENCY", "two"),
        ("CLAIM_WAIT_SECONDS", "-1"),
        ("RPC_TIMEOUT_SECONDS", "0"),
        ("RPC_TIMEOUT_SECONDS", "nan"),
        ("SHUTDOWN_GRACE_SECONDS", "soon"),
        ("JOB_SERVICE_ADDRESS", ""),
        ("WORKER_ID", "x" * 201),
        ("ANALYZER", "no_colon_here"),
        ("METRICS_ADDRESS", "9465"),
        ("METRICS_ADDRESS", "127.0.0.1:http"),
        ("METRICS_ADDRESS", "127.0.0.1:70000"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("S3_REGION", ""),
        ("S3_RETRY_BUDGET_SECONDS", "-5"),
        ("S3_RETRY_BUDGET_SECONDS", "inf"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=PREFIX + name):
        Settings.from_env(env(**{name: value}))


def test_secret_is_not_in_repr() -> None:
    s = Settings.from_env(env(S3_SECRET_ACCESS_KEY="hunter2"))
    assert "hunter2" not in repr(s)


def test_env_table_lists_every_variable_with_a_default_that_parses() -> None:
    table = env_table()
    names = [name for name, _ in table]
    assert len(names) == len(set(names)) == 25
    assert all(name.startswith(PREFIX) for name in names)
    # The documented defaults are the real ones: feeding them back changes nothing.
    assert Settings.from_env(dict(table)) == Settings.from_env({})
    # Every variable in the table is actually read: changing it changes the settings.
    alternatives = {
        "JOB_SERVICE_ADDRESS": "jobs:1",
        "WORKER_ID": "w",
        "CONCURRENCY": "3",
        "CLAIM_WAIT_SECONDS": "1",
        "RPC_TIMEOUT_SECONDS": "1",
        "S3_ENDPOINT_URL": "",
        "S3_REGION": "r",
        "S3_ACCESS_KEY_ID": "a",
        "S3_SECRET_ACCESS_KEY": "s",
        "ANALYZER": "a:b",
        "WORK_DIR": "/w",
        "SHUTDOWN_GRACE_SECONDS": "1",
        "METRICS_ADDRESS": "",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "text",
        "S3_RETRY_BUDGET_SECONDS": "5",
        # security (issue 10)
        "TOKEN": "t",
        "TOKEN_FILE": "/t",
        "TLS_CA_FILE": "/ca",
        "TLS_CLIENT_CERT_FILE": "/c",
        "TLS_CLIENT_KEY_FILE": "/k",
        "PLAINTEXT": "true",
        "S3_BUCKET": "b",
        "S3_UPLOAD_PREFIX": "u/",
        "S3_RESULTS_PREFIX": "r/",
    }
    assert sorted(PREFIX + k for k in alternatives) == sorted(names)
    defaults = Settings.from_env({})
    for field, value in alternatives.items():
        assert Settings.from_env(env(**{field: value})) != defaults, field
