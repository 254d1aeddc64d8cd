"""Client credentials: a bearer token per audience, TLS settings, token minting.

`JobsClient.connect(address, credentials=channel_credentials(address), tokens=tokens_from_env())`
is what jobctl and the demo do. With `tokens`, each call carries the token of its audience:

- UploadService InitiateUpload / CompleteUpload: the uploader's token;
- UploadService GetJob / WatchJob: the operator's if set (operators see every job), else the
  uploader's;
- AdminService: the operator's; WorkerService: the worker's.

A token may also be a `TokenSource`, which re-reads its file whenever it changes (the worker's
rotated token needs no restart).

Tokens come from JOBS_TOKEN_<ROLE> (UPLOADER, WORKER, OPERATOR), or from the file named by
JOBS_TOKEN_<ROLE>_FILE, or from `<dir>/<role>.jwt` in a fallback directory (the dev stack's
.run/auth). TLS: JOBS_TLS_CA_FILE (verify the service), JOBS_TLS_CLIENT_CERT_FILE and
JOBS_TLS_CLIENT_KEY_FILE (mTLS). Without a CA file the channel is plaintext only to a loopback
address (the dev stack) or when JOBS_PLAINTEXT=true; anything else gets TLS with the system's
roots, so a token is never sent in clear to a remote host by accident.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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


def role_for(method: str, tokens: Mapping[str, object]) -> str | None:
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


class TokenSource:
    """A bearer token: fixed, or read from a file again whenever the file changes."""

    def __init__(self, token: str = "", path: str = "") -> None:
        self._token = token.strip()
        self._path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        if self._path is not None:
            self.current()  # fail at start-up, not at the first call

    def current(self) -> str:
        if self._path is None:
            return self._token
        st = os.stat(self._path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._token, self._stamp = self._path.read_text().strip(), stamp
        return self._token


Token = str | TokenSource


class _Bearer:
    def __init__(self, tokens: Mapping[str, Token]) -> None:
        self._tokens = dict(tokens)

    def _details(self, details: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        role = role_for(method, self._tokens)
        given = self._tokens.get(role) if role else None
        token = given.current() if isinstance(given, TokenSource) else given
        if not token:
            return details
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        metadata.append(("authorization", f"Bearer {token}"))
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnaryBearer(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamBearer(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def bearer_interceptors(tokens: Mapping[str, Token]) -> list[Any]:
    """aio client interceptors that add each call's audience token (role -> token)."""
    return [_UnaryUnaryBearer(tokens), _UnaryStreamBearer(tokens)]


def _hosts(target: str) -> list[str]:
    """The hosts a target names: `host:port`, `dns:///host:port`, `ipv4:a:p,b:p`."""
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = target.partition(":")[2].split(",")
    else:
        addresses = [target.removeprefix("dns:").lstrip("/").rpartition("/")[2]]
    return [a.rpartition(":")[0] if ":" in a else a for a in addresses]


def is_loopback(target: str) -> bool:
    """Whether every host the target names is this machine."""
    return all(host in _LOOPBACK for host in _hosts(target))


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
    names = ("JOBS_TLS_CLIENT_CERT_FILE", "JOBS_TLS_CLIENT_KEY_FILE")
    return tls_credentials(ca, cert, key, names=names)


def tls_credentials(
    ca_file: str = "",
    client_cert_file: str = "",
    client_key_file: str = "",
    *,
    names: tuple[str, str] = ("client_cert_file", "client_key_file"),
) -> grpc.ChannelCredentials:
    """TLS verifying the job-service against `ca_file` (or the system roots), with a client
    certificate for mTLS when both files are given (`names`: how the caller's settings call
    them, for the error)."""
    if bool(client_cert_file) != bool(client_key_file):
        raise ValueError(f"{names[0]} and {names[1]} go together (mTLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(client_key_file).read_bytes() if client_key_file else None,
        certificate_chain=Path(client_cert_file).read_bytes() if client_cert_file else None,
    )


# -- `jobctl token create`: minting with the configured signing key ----------------------------
# The same few PyJWT lines as job_service.auth.tokens.mint, reading the same JOB_SERVICE_AUTH_*
# variables: jobs_client imports nothing of the job-service. tests/unit/auth/test_tokens.py
# checks that the job-service accepts what this mints.

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

    try:
        import jwt
    except ImportError:  # the base install is the client; minting is the operator's job
        raise ValueError(
            "minting a token needs PyJWT: pip install 'verified-upload-jobs[service]' "
            "(or PyJWT and cryptography)"
        ) from None

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
