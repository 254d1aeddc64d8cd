"""Alembic environment: async engine from JOB_SERVICE_DATABASE_URL (or the URL a caller put in
the config), target metadata from job_service.storage.tables for `alembic check`."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from job_service.config import Settings
from job_service.storage.tables import metadata

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging"):
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return (
        config.get_main_option("sqlalchemy.url")
        or os.environ.get("JOB_SERVICE_DATABASE_URL")
        or Settings().database_url
    )


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        # Each revision in its own transaction: ALTER TYPE ... ADD VALUE must be committed
        # before a later revision may use the new value.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
