"""Tokens: what jobctl mints is what the service accepts; settings never show secrets."""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from job_service.auth.policy import Role
from job_service.auth.tokens import (
    VERIFIED_CACHE_SIZE,
    ConfigError,
    KeyRing,
    Verifier,
    parse_hs256_secrets,
    parse_ttl,
    unverified_claims,
)
from job_service.config import Settings
from job_service.domain.errors import Unauthenticated
from jobs_client import auth as client_auth
from tests.support import auth


def verifier(**values) -> Verifier:
    s = Settings(**auth.auth_settings(**values))
    return Verifier(s, KeyRing(s))


def test_jobctl_token_create_mints_what_the_service_accepts():
    env = {"JOB_SERVICE_AUTH_HS256_SECRETS": auth.TEST_HS256_SECRETS}
    tok = client_auth.mint_from_env("worker", "fleet-a", client_auth.parse_ttl("30d"), env)
    claims = verifier().verify(tok)
    assert (claims.subject, claims.role) == ("fleet-a", Role.WORKER)
    raw = unverified_claims(tok)
    assert raw["exp"] - raw["iat"] == 30 * 86400 and raw["iss"] == "job-service"


def test_the_ttl_accepts_units():
    assert parse_ttl("30d") == client_auth.parse_ttl("30d") == 30 * 86400
    assert parse_ttl("15m") == 900 and parse_ttl("90") == 90
    with pytest.raises(ValueError):
        parse_ttl("-1h")


def test_short_hs256_secrets_are_refused():
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        parse_hs256_secrets("k=short")
    assert parse_hs256_secrets(f"a={'x' * 32}, b={'y' * 40}") == {
        "a": b"x" * 32,
        "b": b"y" * 40,
    }


def test_a_token_with_an_unknown_role_or_kid_is_refused():
    v = verifier()
    bad_role = auth.token(Role.OPERATOR, extra={"role": "root"})
    with pytest.raises(Unauthenticated) as refused:
        v.verify(bad_role)
    assert refused.value.metadata["problem"] == "role"
    unknown_kid = auth.token(Role.OPERATOR, key=auth.TEST_SECRET.encode(), kid="other")
    with pytest.raises(Unauthenticated) as refused:
        v.verify(unknown_kid)
    assert refused.value.metadata["problem"] == "unknown_key"


def test_settings_repr_never_shows_secrets():
    s = Settings(
        database_url="postgresql+asyncpg://u:db-password-123@h/jobs",
        s3_secret_access_key="s3-secret-456",
        page_token_secret="page-secret-789",
        auth_hs256_secrets=SecretStr(auth.TEST_HS256_SECRETS),
    )
    shown = repr(s) + str(s)
    for secret in ("db-password-123", "s3-secret-456", "page-secret-789", auth.TEST_SECRET):
        assert secret not in shown


def test_client_credentials_pick_the_audience_of_each_call():
    tokens = {"uploader": "u", "operator": "o", "worker": "w"}
    assert client_auth.role_for("/jobs.v1.UploadService/InitiateUpload", tokens) == "uploader"
    assert client_auth.role_for("/jobs.v1.UploadService/GetJob", tokens) == "operator"
    assert client_auth.role_for("/jobs.v1.UploadService/GetJob", {"uploader": "u"}) == "uploader"
    assert client_auth.role_for("/jobs.v1.AdminService/ListJobs", tokens) == "operator"
    assert client_auth.role_for("/jobs.v1.WorkerService/ClaimJob", tokens) == "worker"
    assert client_auth.role_for("/grpc.health.v1.Health/Check", tokens) is None
    # Plaintext only to loopback unless asked; TLS otherwise.
    assert client_auth.channel_credentials("127.0.0.1:50051", {}) is None
    assert client_auth.channel_credentials("jobs.example:443", {}) is not None
    assert client_auth.channel_credentials("jobs.example:443", {"JOBS_PLAINTEXT": "1"}) is None


def test_a_verified_token_is_refused_once_it_expires():
    # Verified tokens are remembered per process; the memory must not outlive the token. The
    # wait is for the token's real expiry (PyJWT reads the clock itself).
    v = verifier(auth_leeway_seconds=0)
    tok = auth.token(Role.WORKER, ttl=1.0)
    assert v.verify(tok).role == Role.WORKER
    assert v.verify(tok).role == Role.WORKER  # from memory
    time.sleep(1.5)
    with pytest.raises(Unauthenticated) as refused:
        v.verify(tok)
    assert refused.value.metadata["problem"] == "expired"


def test_remembered_tokens_are_bounded_and_forget_the_oldest():
    v = verifier()
    first = auth.token(Role.WORKER, "first")
    v.verify(first)
    for i in range(VERIFIED_CACHE_SIZE):
        v.verify(auth.token(Role.WORKER, f"w{i}"))
    assert len(v._verified) == VERIFIED_CACHE_SIZE and first not in v._verified
    assert v.verify(first).subject == "first"  # verified again, not refused
