"""Quick pass: probe values and thumbnails against videos whose content we generated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from analysis_worker.analysis import PyAVAnalyzer, thumbnails
from localinfra.media import VideoInfo, make_video


def _decode_image(path: Path) -> Any:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def _dominant_channel(path: Path) -> str:
    means = _decode_image(path).reshape(-1, 3).mean(axis=0)
    return "rgb"[int(np.argmax(means))]


def test_probe_matches_generated_video(
    analyzer: PyAVAnalyzer, cuts_video: VideoInfo, tmp_path: Path
) -> None:
    probe = analyzer.quick(cuts_video.path, tmp_path).probe

    assert (probe.width, probe.height) == (cuts_video.width, cuts_video.height)
    assert probe.fps == pytest.approx(cuts_video.fps, rel=1e-3)
    assert probe.duration_s == pytest.approx(cuts_video.duration_s, abs=1.5 / cuts_video.fps)
    assert probe.frame_count == cuts_video.frame_count
    assert probe.codec == cuts_video.codec_name
    assert "mp4" in probe.container_format
    assert probe.rotation == 0
    assert probe.has_audio is False
    assert probe.bit_rate is not None and probe.bit_rate > 0


def test_has_audio_when_the_file_has_a_sound_track(
    analyzer: PyAVAnalyzer, media_dir: Path, tmp_path: Path
) -> None:
    video = make_video(media_dir / "with_audio.mp4", seconds=1.0, audio=True)
    assert analyzer.quick(video.path, tmp_path).probe.has_audio is True


def test_thumbnails_are_scaled_jpegs_of_evenly_spaced_moments(
    analyzer: PyAVAnalyzer, thirds_video: VideoInfo, tmp_path: Path
) -> None:
    out = tmp_path / "out"  # does not exist yet: quick must create it
    result = analyzer.quick(thirds_video.path, out)

    assert len(result.thumbnails) == 3
    for thumb in result.thumbnails:
        assert thumb.parent == out and thumb.suffix == ".jpg" and thumb.stat().st_size > 0
        height, width, _ = _decode_image(thumb).shape
        assert (width, height) == (320, 180)  # 640x360 halved, aspect kept
    # Targets are 1/4, 2/4, 3/4 of 3 s: one thumbnail per colour scene, in order.
    assert [_dominant_channel(t) for t in result.thumbnails] == ["r", "g", "b"]


def test_thumbnails_fall_back_to_sequential_decode_when_seeking_fails(
    analyzer: PyAVAnalyzer, thirds_video: VideoInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_seek(*args: object) -> None:
        raise av.error.InvalidDataError(1094995529, "seek failed")

    monkeypatch.setattr(thumbnails, "_grab_by_seeking", broken_seek)
    result = analyzer.quick(thirds_video.path, tmp_path)

    assert [_dominant_channel(t) for t in result.thumbnails] == ["r", "g", "b"]


def test_seeking_is_used_when_it_works(
    analyzer: PyAVAnalyzer, thirds_video: VideoInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_fallback(*args: object) -> None:
        raise AssertionError("sequential fallback used although seeking works")

    monkeypatch.setattr(thumbnails, "grab_frames_sequentially", no_fallback)
    assert len(analyzer.quick(thirds_video.path, tmp_path).thumbnails) == 3


def test_rotation_is_probed_and_thumbnails_are_upright(
    analyzer: PyAVAnalyzer, media_dir: Path, tmp_path: Path
) -> None:
    video = make_video(media_dir / "portrait.mp4", seconds=1.0, rotation=90)
    result = analyzer.quick(video.path, tmp_path)

    assert result.probe.rotation == 90
    assert (result.probe.width, result.probe.height) == (160, 120)  # stored, not displayed
    height, width, _ = _decode_image(result.thumbnails[0]).shape
    assert (width, height) == (120, 160)


def test_quick_result_to_dict_is_json(
    analyzer: PyAVAnalyzer, static_video: VideoInfo, tmp_path: Path
) -> None:
    result = analyzer.quick(static_video.path, tmp_path)
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    assert set(doc) == {"probe", "thumbnails"}
    assert set(doc["probe"]) == {
        "container_format", "duration_s", "width", "height", "fps", "codec",
        "bit_rate", "rotation", "frame_count", "has_audio",
    }  # fmt: skip
    assert doc["thumbnails"] == [str(p) for p in result.thumbnails]


def test_thumbnails_skip_black_and_white_frames(
    analyzer: PyAVAnalyzer, media_dir: Path, tmp_path: Path
) -> None:
    """Targets at 1/4 and 2/4 land in a black stretch, 3/4 in a white flash: each thumbnail
    moves on to the next real picture instead."""
    video = make_video(
        media_dir / "dark.mp4",
        width=320,
        height=180,
        scenes=[(0.4, "moving"), (1.3, "black"), (0.3, "white"), (0.6, "moving"), (0.4, "red")],
    )
    result = analyzer.quick(video.path, tmp_path)

    assert result.thumbnails
    for thumb in result.thumbnails:
        pixels = _decode_image(thumb).astype(np.float64)
        mean, std = pixels.mean(), pixels.std()
        assert std >= 4 or 24 <= mean <= 232, (thumb.name, mean, std)
