"""Fixtures of the chaos suite: the scale (CHAOS_SCALE=short|full), a fleet per scenario that
is torn down whatever happens, and the figures every scenario prints in pytest's summary (and
appends to .chaos/figures.jsonl for the before/after record)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from localinfra.postgres import PostgresCluster
from localinfra.s3 import MotoS3
from tests.chaos.harness import Figures, Fleet, JobsDb, Scale

ROOT = Path(__file__).resolve().parents[2]
FIGURES_FILE = ROOT / ".chaos" / "figures.jsonl"
_FIGURES = pytest.StashKey[list[Figures]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault scenarios over the real processes")
    config.stash[_FIGURES] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(_FIGURES, [])
    if figures:
        terminalreporter.section("chaos figures")
        for fig in figures:
            terminalreporter.write_line(fig.render())


@pytest.fixture(scope="session")
def chaos_scale() -> Scale:
    return Scale.from_env()


@pytest.fixture
async def fleet(moto_s3: MotoS3, tmp_path: Path, chaos_scale: Scale) -> AsyncIterator[Fleet]:
    running = Fleet(tmp_path, moto_s3, chaos_scale)
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
def jobs_db(pg: PostgresCluster, database_url: str) -> JobsDb:
    """This test's database (a fresh migrated copy), read directly."""
    return JobsDb.from_url(pg, database_url)


@pytest.fixture
def figures(
    request: pytest.FixtureRequest, chaos_scale: Scale
) -> Iterator[Callable[[str], Figures]]:
    """Factory: `fig = figures("name")`; filled by the test, printed and saved at teardown
    (also when the test failed: the figures of a red scenario are the "before" figures)."""
    made: list[Figures] = []

    def make(scenario: str) -> Figures:
        fig = Figures(scenario, chaos_scale.name)
        made.append(fig)
        return fig

    started = time.monotonic()
    yield make
    elapsed = round(time.monotonic() - started, 1)
    FIGURES_FILE.parent.mkdir(exist_ok=True)
    for fig in made:
        fig.notes.setdefault("scenario seconds", elapsed)
        request.config.stash[_FIGURES].append(fig)
        with FIGURES_FILE.open("a") as out:
            record = {"test": request.node.nodeid, "at": time.time(), **dataclasses.asdict(fig)}
            out.write(json.dumps(record, default=str) + "\n")
