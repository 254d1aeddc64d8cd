"""Run Alembic programmatically (service start-up checks, tests, `make run`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["skip_logging"] = True
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def check(database_url: str) -> None:
    """Raise if the migrated schema differs from job_service.storage.tables."""
    command.check(alembic_config(database_url))


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    # env.py runs its own event loop, so Alembic runs in a thread.
    await asyncio.to_thread(upgrade, database_url, revision)
