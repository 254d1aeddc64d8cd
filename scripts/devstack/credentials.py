"""Throwaway credentials for `make run` (job_service.auth.devkeys): a fresh HS256 key per run
under .run/auth/ and one token per audience, so the dev stack runs with authentication on.

The stack stays plaintext on 127.0.0.1 (JOB_SERVICE_GRPC_PLAINTEXT=true, which the job-service
logs as a warning): the banner's grpcurl commands and `make demo` need no CA.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from job_service.auth.devkeys import SECRET_FILE, write_dev_credentials
from job_service.auth.policy import Role


def token_env(role: Role) -> str:
    """JOBS_TOKEN_UPLOADER, JOBS_TOKEN_WORKER, JOBS_TOKEN_OPERATOR."""
    return f"JOBS_TOKEN_{role.value.upper()}"


@dataclasses.dataclass(frozen=True)
class DevCredentials:
    directory: Path
    tokens: dict[Role, str]

    @classmethod
    def create(cls, run_dir: Path) -> DevCredentials:
        directory = run_dir / "auth"
        _, tokens = write_dev_credentials(directory)
        return cls(directory, tokens)

    def token_file(self, role: Role) -> Path:
        return self.directory / f"{role.value}.jwt"

    def service_env(self) -> dict[str, str]:
        return {
            "JOB_SERVICE_AUTH_REQUIRED": "true",
            "JOB_SERVICE_AUTH_HS256_SECRETS_FILE": str(self.directory / SECRET_FILE),
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
