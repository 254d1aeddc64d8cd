"""Throwaway credentials for a desk (`make run`, docker compose): a fresh HS256 secret and one
token per audience, written 0600 into a directory. Never for a deployment (README, Security)."""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import SecretStr

from job_service.auth.policy import Role
from job_service.auth.tokens import mint
from job_service.config import Settings

KID = "dev"
TOKEN_TTL_SECONDS = 7 * 86400
SUBJECTS = {Role.UPLOADER: "dev-uploader", Role.WORKER: "dev-worker", Role.OPERATOR: "dev-operator"}
SECRET_FILE = "hs256.secret"


def _private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def write_dev_credentials(directory: Path, *, keep: bool = False) -> tuple[str, dict[Role, str]]:
    """(`kid=secret`, tokens by role). `keep`: reuse a secret already in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    secret_path = directory / SECRET_FILE
    if keep and secret_path.is_file():
        entry = secret_path.read_text().strip()
    else:
        entry = f"{KID}={secrets.token_urlsafe(48)}"
        _private(secret_path, entry + "\n")
    settings = Settings(auth_hs256_secrets=SecretStr(entry))
    tokens = {
        role: mint(settings, role=role, subject=subject, ttl_seconds=TOKEN_TTL_SECONDS)
        for role, subject in SUBJECTS.items()
    }
    for role, tok in tokens.items():
        _private(directory / f"{role.value}.jwt", tok + "\n")
    return entry, tokens
