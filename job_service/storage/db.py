"""Engine creation and the unit of work: one transaction per use case, and the one place where
database connectivity failures become the domain's DatabaseUnavailable."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from job_service.domain.errors import DatabaseUnavailable

_UNAVAILABLE = (
    OSError,  # connection refused / reset, DNS
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)


def create_engine(url: str, *, pool_size: int = 10, connect_timeout: float = 5.0) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=connect_timeout,
        # No pre-ping: it costs a round trip per transaction. A connection broken by a
        # database restart fails one call with UNAVAILABLE (retryable) and is discarded.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"timeout": connect_timeout, "command_timeout": 30},
    )


def asyncpg_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg wants, from a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.TimeoutError):  # pool checkout timed out
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = getattr(exc.orig, "__cause__", None) or exc.orig
        return isinstance(orig, _UNAVAILABLE) or isinstance(exc.orig, _UNAVAILABLE)
    return isinstance(exc, _UNAVAILABLE)


@contextlib.asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that commits when the block ends without an exception."""
    try:
        async with engine.begin() as conn:
            yield conn
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(
                f"the job database is unreachable ({type(exc).__name__}); nothing was changed, "
                "retry later"
            ) from exc
        raise
