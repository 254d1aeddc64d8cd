"""The settings mechanism (pydantic-settings) as the job-service uses it; the worker's
own rules are in tests/unit/worker/test_worker_config.py."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from job_service.config import PREFIX, Settings, SettingsError


def test_the_constructor_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_SERVICE_S3_BUCKET", "from-the-shell")
    assert Settings().s3_bucket == "videos"
    assert Settings(s3_bucket="given").s3_bucket == "given"
    assert Settings.from_env().s3_bucket == "from-the-shell"


def test_from_env_coerces_every_field_and_the_defaults_round_trip() -> None:
    table = Settings.env_table()
    assert len(table) == len(Settings.model_fields)
    assert Settings.from_env(dict(table)) == Settings()
    s = Settings.from_env({"JOB_SERVICE_MAX_ATTEMPTS": "7", "JOB_SERVICE_LEASE_SECONDS": "40"})
    assert (s.max_attempts, s.lease_seconds) == (7, 40.0)
    # Names compare case-insensitively, as pydantic-settings does with os.environ.
    assert Settings.from_env({"job_service_max_attempts": "8"}).max_attempts == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEASE_SECONDS", "soon"),
        ("LEASE_SECONDS", "0"),
        ("MAX_ATTEMPTS", "0"),
        ("MAX_ATTEMPTS", "2.5"),
        ("CLAIM_MAX_JOBS", "-1"),
        ("MAX_UPLOAD_BYTES", "0"),
        ("DB_POOL_SIZE", "ten"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(f"{PREFIX}{name}='{value}'")):
        Settings.from_env({PREFIX + name: value})


def test_a_rule_across_fields_names_both_variables() -> None:
    with pytest.raises(ValueError, match=r"HEARTBEAT_INTERVAL_SECONDS.*LEASE_SECONDS"):
        Settings.from_env({"JOB_SERVICE_LEASE_SECONDS": "10"})
    with pytest.raises(ValidationError):
        Settings(lease_seconds=10)


def test_settings_are_frozen_and_reject_unknown_fields() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.max_attempts = 9  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Settings(max_atempts=9)  # type: ignore[call-arg]
