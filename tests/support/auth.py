"""Credentials as the tests hold them: a test signing key in every service's settings, tokens
per audience, and channels that send each service's calls with the token of its audience.

`channel(address)` is what tests dial the job-service with: UploadService calls carry the
uploader's token, WorkerService calls the worker's, AdminService calls the operator's, health
none. Pass `tokens=` to act as someone else (another uploader, a wrong role, no token)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from pydantic import SecretStr

from job_service.auth.policy import Role
from job_service.auth.tokens import mint
from job_service.config import Settings

#: The HS256 key of every test service (settings_for), under kid "test".
TEST_KID = "test"
TEST_SECRET = "test-only-secret-0123456789abcdef-0123456789abcdef"
TEST_HS256_SECRETS = f"{TEST_KID}={TEST_SECRET}"

UPLOADER = "test-uploader"
WORKER = "test-worker"
OPERATOR = "test-operator"
SUBJECTS = {Role.UPLOADER: UPLOADER, Role.WORKER: WORKER, Role.OPERATOR: OPERATOR}

#: Which audience's token a call to each service carries.
AUDIENCE_OF = {
    "jobs.v1.UploadService": Role.UPLOADER,
    "jobs.v1.WorkerService": Role.WORKER,
    "jobs.v1.AdminService": Role.OPERATOR,
}


def auth_settings(**overrides: Any) -> dict[str, Any]:
    """The settings values that turn authentication on with the test key."""
    values: dict[str, Any] = {"auth_hs256_secrets": SecretStr(TEST_HS256_SECRETS)}
    values.update(overrides)
    return values


def token(
    role: Role | str,
    subject: str | None = None,
    *,
    ttl: float = 3600.0,
    settings: Settings | None = None,
    **kwargs: Any,
) -> str:
    """A token the test services accept (unless `kwargs`/`settings` say otherwise)."""
    s = settings or Settings(**auth_settings())
    role = Role(role)
    return mint(s, role=role, subject=subject or SUBJECTS[role], ttl_seconds=ttl, **kwargs)


def tokens_per_service(
    uploader: str | None = None, worker: str | None = None, operator: str | None = None
) -> dict[str, str]:
    by_role = {
        Role.UPLOADER: uploader or token(Role.UPLOADER),
        Role.WORKER: worker or token(Role.WORKER),
        Role.OPERATOR: operator or token(Role.OPERATOR),
    }
    return {service: by_role[role] for service, role in AUDIENCE_OF.items()}


def _service(method: str | bytes) -> str:
    text = method.decode() if isinstance(method, bytes) else method
    return text.lstrip("/").partition("/")[0]


class _Bearer:
    """Adds `authorization: Bearer <token>` chosen by the called service."""

    def __init__(self, tokens: Mapping[str, str | None]) -> None:
        self._tokens = dict(tokens)

    def _details(self, details: Any) -> Any:
        tok = self._tokens.get(_service(details.method))
        if tok is None:
            return details
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
        metadata.append(("authorization", f"Bearer {tok}"))
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def interceptors(tokens: Mapping[str, str | None] | None = None) -> Sequence[Any]:
    t = tokens_per_service() if tokens is None else tokens
    return [_UnaryUnary(t), _UnaryStream(t)]


def channel(
    address: str,
    *,
    tokens: Mapping[str, str | None] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An aio channel whose calls carry the audience's token (`tokens`: service -> token;
    default: the three test audiences). `credentials`: TLS instead of plaintext."""
    if credentials is not None:
        return grpc.aio.secure_channel(
            address, credentials, options=options, interceptors=interceptors(tokens)
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors(tokens))


def as_role(role: Role | str, subject: str | None = None, **kwargs: Any) -> dict[str, str]:
    """`tokens=` that send one token (role/subject) to every service."""
    tok = token(role, subject, **kwargs)
    return dict.fromkeys(AUDIENCE_OF, tok)


def bearer(tok: str) -> tuple[tuple[str, str]]:
    """Call metadata for one call: `stub.X(req, metadata=bearer(tok))`."""
    return (("authorization", f"Bearer {tok}"),)


def service_env(settings: Settings) -> dict[str, str]:
    """JOB_SERVICE_* for a service process with these settings (secrets unwrapped)."""
    out = {}
    for name, _ in Settings.env_table():
        value = getattr(settings, name.removeprefix("JOB_SERVICE_").lower())
        out[name] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return out


def worker_env(role_subject: str = WORKER) -> dict[str, str]:
    """ANALYSIS_WORKER_* that let a worker process call the test services."""
    return {
        "ANALYSIS_WORKER_TOKEN": token(Role.WORKER, role_subject),
        "ANALYSIS_WORKER_PLAINTEXT": "true",
    }


class _SyncBearer(grpc.StreamStreamClientInterceptor, grpc.UnaryUnaryClientInterceptor):
    """The same for synchronous channels (grpcio's reflection client is synchronous)."""

    def __init__(self, tok: str) -> None:
        self._tok = tok

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self._tok}")]
        return _SyncDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(
        self,
        method: Any,
        timeout: Any,
        metadata: Any,
        credentials: Any,
        wait_for_ready: Any,
        compression: Any,
    ) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (
            credentials,
            wait_for_ready,
            compression,
        )


def sync_channel(address: str, tok: str | None = None) -> grpc.Channel:
    """A synchronous plaintext channel whose calls carry `tok` (default: an operator's)."""
    return grpc.intercept_channel(
        grpc.insecure_channel(address), _SyncBearer(tok or token(Role.OPERATOR))
    )


def jobctl_env() -> dict[str, str]:
    """JOBS_TOKEN_<ROLE> for jobctl and the demo: one token per audience."""
    return {f"JOBS_TOKEN_{role.value.upper()}": token(role) for role in Role}


def tokens_by_role() -> dict[str, str]:
    """role name -> token, as jobs_client's `tokens=` takes them (the test audiences)."""
    return {role.value: token(role) for role in Role}
