"""The token denylist (revision 0009), behind the `RevocationRecords` port (job_service/ports.py):
each operation is one short transaction of its own."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from job_service.storage.db import transaction
from job_service.storage.tables import revoked_tokens


class RevocationDatabase:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def revoke(
        self, jti: str, *, subject: str = "", reason: str = "", expires_at: datetime | None = None
    ) -> bool:
        stmt = (
            pg_insert(revoked_tokens)
            .values(jti=jti, subject=subject, reason=reason, expires_at=expires_at)
            .on_conflict_do_nothing(index_elements=["jti"])
            .returning(revoked_tokens.c.jti)
        )
        async with transaction(self._engine) as conn:
            return (await conn.execute(stmt)).first() is not None

    async def revoked_jtis(self) -> set[str]:
        stmt = select(revoked_tokens.c.jti).where(
            or_(revoked_tokens.c.expires_at.is_(None), revoked_tokens.c.expires_at > func.now())
        )
        async with transaction(self._engine) as conn:
            return {r[0] for r in await conn.execute(stmt)}
