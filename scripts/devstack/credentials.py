"""Throwaway credentials for `make run`: a fresh HS256 key per run under .run/auth/, and one
token per audience, so the dev stack runs with authentication on like production.

The stack stays plaintext on 127.0.0.1 (JOB_SERVICE_GRPC_PLAINTEXT=true, which the job-service
logs as a warning): the banner's grpcurl commands and `make demo` need no CA. Everything here
is for a desk, never for a deployment (README, Security).
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

from pydantic import SecretStr

from job_service.auth.policy import Role
from job_service.auth.tokens import mint
from job_service.config import Settings

KID = "dev"
TOKEN_TTL_SECONDS = 7 * 86400
SUBJECTS = {Role.UPLOADER: "dev-uploader", Role.WORKER: "dev-worker", Role.OPERATOR: "dev-operator"}


def token_env(role: Role) -> str:
    """JOBS_TOKEN_UPLOADER, JOBS_TOKEN_WORKER, JOBS_TOKEN_OPERATOR."""
    return f"JOBS_TOKEN_{role.value.upper()}"


def _private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@dataclasses.dataclass(frozen=True)
class DevCredentials:
    directory: Path
    secret: str
    tokens: dict[Role, str]

    @classmethod
    def create(cls, run_dir: Path) -> DevCredentials:
        directory = run_dir / "auth"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        secret = secrets.token_urlsafe(48)
        _private(directory / "hs256.secret", secret + "\n")
        settings = Settings(auth_hs256_secrets=SecretStr(f"{KID}={secret}"))
        tokens = {
            role: mint(settings, role=role, subject=subject, ttl_seconds=TOKEN_TTL_SECONDS)
            for role, subject in SUBJECTS.items()
        }
        for role, tok in tokens.items():
            _private(directory / f"{role.value}.jwt", tok + "\n")
        return cls(directory, secret, tokens)

    def token_file(self, role: Role) -> Path:
        return self.directory / f"{role.value}.jwt"

    def service_env(self) -> dict[str, str]:
        return {
            "JOB_SERVICE_AUTH_REQUIRED": "true",
            "JOB_SERVICE_AUTH_HS256_SECRETS": f"{KID}={self.secret}",
            "JOB_SERVICE_GRPC_PLAINTEXT": "true",
            "JOB_SERVICE_REFLECTION": "open",
        }

    def worker_env(self) -> dict[str, str]:
        return {
            "ANALYSIS_WORKER_TOKEN_FILE": str(self.token_file(Role.WORKER)),
            "ANALYSIS_WORKER_PLAINTEXT": "true",
        }

    def exports(self) -> list[str]:
        return [f"export {token_env(role)}={tok}" for role, tok in self.tokens.items()]
