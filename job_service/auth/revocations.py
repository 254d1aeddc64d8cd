"""Revoked tokens: a denylist by `jti` in the database, held in memory and re-read every
JOB_SERVICE_AUTH_REVOCATION_REFRESH_SECONDS.

Checking a call never touches the database (the lease path stays one round trip). A refresh that
fails keeps the last list and is retried at the next tick; the staleness is visible in the
`auth_denylist_age_seconds` log field of the warning.
"""

from __future__ import annotations

import logging
import time

from job_service.ports import RevocationRecords

log = logging.getLogger(__name__)


class DenyList:
    def __init__(self, records: RevocationRecords) -> None:
        self._records = records
        self._jtis: frozenset[str] = frozenset()
        self.loaded_at = 0.0

    def __contains__(self, jti: str) -> bool:
        return jti in self._jtis

    def __len__(self) -> int:
        return len(self._jtis)

    async def refresh(self) -> None:
        self._jtis = frozenset(await self._records.revoked_jtis())
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
