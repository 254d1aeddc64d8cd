"""The statements of the token denylist (revision 0009); callers own the transaction."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from job_service.storage.tables import revoked_tokens


async def revoke(
    conn: AsyncConnection, jti: str, *, subject: str, reason: str, expires_at: datetime | None
) -> bool:
    """Adds `jti` to the denylist; False when it was already there."""
    stmt = (
        pg_insert(revoked_tokens)
        .values(jti=jti, subject=subject, reason=reason, expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=["jti"])
        .returning(revoked_tokens.c.jti)
    )
    return (await conn.execute(stmt)).first() is not None


async def revoked_jtis(conn: AsyncConnection) -> set[str]:
    """Every jti revoked whose token has not expired yet (expired ones are refused anyway)."""
    rows = await conn.execute(
        select(revoked_tokens.c.jti).where(
            or_(revoked_tokens.c.expires_at.is_(None), revoked_tokens.c.expires_at > func.now())
        )
    )
    return {r[0] for r in rows}
