"""Each detection rule on real decoded footage: clips from ffmpeg's lavfi sources, with the
truth known by construction (tests/bench_analysis/clips.py builds them for the bench too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis_worker.analysis import DeepResult, PyAVAnalyzer
from tests.bench_analysis.clips import ClipSpec, Shot, Truth, generate

W, H = 640, 360


def _run(spec: ClipSpec, tmp_path: Path) -> tuple[DeepResult, Truth]:
    truth = generate(spec, W, H, tmp_path / f"{spec.name}.mp4")
    result = PyAVAnalyzer().deep(
        tmp_path / f"{spec.name}.mp4", tmp_path / "out", lambda _f: None, lambda: False
    )
    assert result.frames_decoded == truth.frames
    return result, truth


def test_hard_cuts_between_busy_textures(tmp_path: Path) -> None:
    """Every shot changes everywhere every frame (automata, zooms, scrolling texture)."""
    spec = ClipSpec(
        "textures",
        (
            Shot("cellauto", 40),
            Shot("scroll", 40, 40),
            Shot("life", 40),
            Shot("mandelbrot", 40),
            Shot("sierpinski", 40, 60),
        ),
    )
    result, truth = _run(spec, tmp_path)
    assert [c.frame for c in result.cuts] == truth.cuts
    assert result.transitions == ()


@pytest.mark.parametrize("length", [1, 2, 3])
def test_a_white_flash_is_not_a_cut(tmp_path: Path, length: int) -> None:
    spec = ClipSpec("flash", (Shot("testsrc2", 60),), flashes=((30, length),))
    result, _ = _run(spec, tmp_path)
    assert result.cuts == ()
    assert result.flashes >= 1


def test_fast_pans_and_zooms_are_not_cuts(tmp_path: Path) -> None:
    spec = ClipSpec("motion", (Shot("pan", 72), Shot("mandelbrot", 60), Shot("pan", 48, 200)))
    result, truth = _run(spec, tmp_path)
    assert [c.frame for c in result.cuts] == truth.cuts == [72, 132]


def test_a_cross_dissolve_is_a_transition_not_a_cut(tmp_path: Path) -> None:
    spec = ClipSpec(
        "dissolve",
        (Shot("testsrc2", 48), Shot("gradients", 60, join="dissolve", dissolve=24)),
    )
    result, truth = _run(spec, tmp_path)
    assert result.cuts == ()
    [(start, end)] = truth.dissolves
    [found] = result.transitions
    assert found.kind == "dissolve"
    # Its ends are estimated from the best-fitting window length: within a quarter of it.
    slack = (end - start) // 4
    assert abs(found.start_frame - start) <= slack and abs(found.end_frame - end) <= slack
    assert found.end_s > found.start_s
