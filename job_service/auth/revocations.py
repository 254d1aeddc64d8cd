"""Revoked tokens: a denylist by `jti` in the database, held in memory and re-read every
JOB_SERVICE_AUTH_REVOCATION_REFRESH_SECONDS.

Checking a call never touches the database (the lease path stays one round trip). A refresh that
fails keeps the last list and is retried at the next tick; the staleness is visible in the
`auth_denylist_age_seconds` log field of the warning.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from job_service.storage import revocations as denylist_sql
from job_service.storage.db import transaction

log = logging.getLogger(__name__)


class DenyList:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._jtis: frozenset[str] = frozenset()
        self.loaded_at = 0.0

    def __contains__(self, jti: str) -> bool:
        return jti in self._jtis

    def __len__(self) -> int:
        return len(self._jtis)

    async def refresh(self) -> None:
        async with transaction(self._engine) as conn:
            jtis = await denylist_sql.revoked_jtis(conn)
        self._jtis = frozenset(jtis)
        self.loaded_at = time.monotonic()

    async def refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a database outage must not stop authentication
            log.warning(
                "could not re-read the revoked-token list; using the last one",
                extra={"auth_denylist_age_seconds": round(time.monotonic() - self.loaded_at, 1)},
                exc_info=True,
            )


async def revoke(
    engine: AsyncEngine,
    jti: str,
    *,
    subject: str = "",
    reason: str = "",
    expires_at: datetime | None = None,
) -> bool:
    async with transaction(engine) as conn:
        return await denylist_sql.revoke(
            conn, jti, subject=subject, reason=reason, expires_at=expires_at
        )
