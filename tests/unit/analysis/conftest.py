"""Shared fixtures: small synthetic videos with known cuts and motion, generated once per run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# localinfra is a top-level helper directory, not an installed package.
_REPO_ROOT = Path(__file__).resolve().parents[3]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from analysis_worker.analysis import PyAVAnalyzer  # noqa: E402
from localinfra.media import VideoInfo, make_video  # noqa: E402


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def cuts_video(media_dir: Path) -> VideoInfo:
    """Hard cuts at frames 18, 30, 48 and 60 (moving square -> white -> blue -> gray -> still)."""
    return make_video(
        media_dir / "cuts.mp4",
        scenes=[(0.75, "moving"), (0.5, "white"), (0.75, "blue"), (0.5, "gray"), (0.5, "still")],
    )


@pytest.fixture(scope="session")
def static_video(media_dir: Path) -> VideoInfo:
    return make_video(media_dir / "static.mp4", seconds=2.0, scenes=[(2.0, "still")])


@pytest.fixture(scope="session")
def activity_video(media_dir: Path) -> VideoInfo:
    """The square moves during [1, 2) s and [3, 3.5) s and rests otherwise; no cuts."""
    return make_video(
        media_dir / "activity.mp4",
        scenes=[(1.0, "still"), (1.0, "moving"), (1.0, "still"), (0.5, "moving"), (0.5, "still")],
        speed=4,
    )


@pytest.fixture(scope="session")
def thirds_video(media_dir: Path) -> VideoInfo:
    """640x360 red, green, blue thirds: each thumbnail (1/4, 2/4, 3/4) shows one colour."""
    return make_video(
        media_dir / "thirds.mp4",
        width=640,
        height=360,
        fps=25,
        scenes=[(1.0, "red"), (1.0, "green"), (1.0, "blue")],
    )


@pytest.fixture
def analyzer() -> PyAVAnalyzer:
    return PyAVAnalyzer()
