"""Client-side credentials for jobctl and the demo: a bearer token per audience, TLS settings.

Self-contained (grpc only, nothing of the job-service) so it moves with jobctl into the client
library. Each call carries the token of its audience:

- UploadService InitiateUpload / CompleteUpload: the uploader's token;
- UploadService GetJob / WatchJob: the operator's if set (operators see every job), else the
  uploader's;
- AdminService: the operator's; WorkerService: the worker's.

Tokens come from JOBS_TOKEN_<ROLE> (UPLOADER, WORKER, OPERATOR), or from the file named by
JOBS_TOKEN_<ROLE>_FILE, or from `<dir>/<role>.jwt` in a fallback directory (the dev stack's
.run/auth). TLS: JOBS_TLS_CA_FILE (verify the service), JOBS_TLS_CLIENT_CERT_FILE and
JOBS_TLS_CLIENT_KEY_FILE (mTLS). Without a CA file the channel is plaintext only to a loopback
address (the dev stack) or when JOBS_PLAINTEXT=true; anything else gets TLS with the system's
roots, so a token is never sent in clear to a remote host by accident.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

ROLES = ("uploader", "worker", "operator")
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def tokens_from_env(
    environ: Mapping[str, str] | None = None, fallback_dir: Path | None = None
) -> dict[str, str]:
    """role -> token, for the roles that have one."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for role in ROLES:
        name = f"JOBS_TOKEN_{role.upper()}"
        value = env.get(name, "").strip()
        path = env.get(f"{name}_FILE", "").strip()
        if not value and path:
            value = Path(path).read_text().strip()
        if not value and fallback_dir is not None and (fallback_dir / f"{role}.jwt").is_file():
            value = (fallback_dir / f"{role}.jwt").read_text().strip()
        if value:
            out[role] = value
    return out


def role_for(method: str, tokens: Mapping[str, str]) -> str | None:
    service, _, name = method.lstrip("/").partition("/")
    if service.endswith(".WorkerService"):
        return "worker"
    if service.endswith(".AdminService"):
        return "operator"
    if service.endswith(".UploadService"):
        if name in ("GetJob", "WatchJob", "ListUploadedParts") and "operator" in tokens:
            return "operator"
        return "uploader"
    return None


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str | bytes]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = tuple(metadata)
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class BearerPerAudience(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = dict(tokens)

    def _details(self, details: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        role = role_for(method, self._tokens)
        token = self._tokens.get(role) if role else None
        if token is None:
            return details
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        metadata.append(("authorization", f"Bearer {token}"))
        return _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0] if ":" in address else address
    return host in _LOOPBACK


def channel_credentials(
    address: str, environ: Mapping[str, str] | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from JOBS_TLS_*; None means plaintext (see the module docstring)."""
    env = os.environ if environ is None else environ
    ca = env.get("JOBS_TLS_CA_FILE", "").strip()
    cert = env.get("JOBS_TLS_CLIENT_CERT_FILE", "").strip()
    key = env.get("JOBS_TLS_CLIENT_KEY_FILE", "").strip()
    plaintext = env.get("JOBS_PLAINTEXT", "").strip().lower() in ("1", "true", "yes")
    if not (ca or cert) and (plaintext or is_loopback(address)):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def secure_channel(
    address: str,
    *,
    tokens: Mapping[str, str],
    options: Sequence[tuple[str, Any]] = (),
    environ: Mapping[str, str] | None = None,
) -> grpc.Channel:
    """A synchronous channel with TLS per JOBS_TLS_* and the audience's token on each call."""
    creds = channel_credentials(address, environ)
    base = (
        grpc.secure_channel(address, creds, options=list(options))
        if creds is not None
        else grpc.insecure_channel(address, options=list(options))
    )
    return grpc.intercept_channel(base, BearerPerAudience(tokens))


# -- `jobctl token create`: minting with the configured signing key ----------------------------
# The same few PyJWT lines as job_service.auth.tokens.mint, reading the same JOB_SERVICE_AUTH_*
# variables, so jobctl needs nothing of the job-service; tests/unit/auth/test_tokens.py checks
# that the job-service accepts what this mints.

_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _TTL_UNITS[t[-1]] if t and t[-1] in _TTL_UNITS else float(t)
    except ValueError:
        raise ValueError(f"ttl {text!r}: use e.g. 30d, 12h, 15m or seconds") from None
    if value <= 0:
        raise ValueError("ttl must be positive")
    return value


def mint_from_env(
    role: str, subject: str, ttl_seconds: float, environ: Mapping[str, str] | None = None
) -> str:
    import time
    import uuid

    import jwt

    env = os.environ if environ is None else environ
    algorithm = env.get("JOB_SERVICE_AUTH_ALGORITHM", "HS256")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key: Any
    if algorithm == "HS256":
        first = next(
            (
                p.strip()
                for p in env.get("JOB_SERVICE_AUTH_HS256_SECRETS", "").split(",")
                if p.strip()
            ),
            "",
        )
        if not first:
            raise ValueError("set JOB_SERVICE_AUTH_HS256_SECRETS (the service's signing secret)")
        kid, sep, secret = first.partition("=")
        if not sep:
            kid, secret = "", first
        key = secret.encode()
    else:
        path = env.get("JOB_SERVICE_AUTH_SIGNING_KEY_FILE", "")
        if not path:
            raise ValueError(f"{algorithm} needs JOB_SERVICE_AUTH_SIGNING_KEY_FILE (PEM)")
        key, kid = Path(path).read_bytes(), env.get("JOB_SERVICE_AUTH_SIGNING_KID", "")
    now = int(time.time())
    claims = {
        "iss": env.get("JOB_SERVICE_AUTH_ISSUER", "job-service"),
        "aud": env.get("JOB_SERVICE_AUTH_AUDIENCE", "jobs.v1"),
        "sub": subject,
        env.get("JOB_SERVICE_AUTH_ROLE_CLAIM", "role"): role,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": int(now + ttl_seconds),
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)
