"""Files that are not decodable video must fail with INVALID_MEDIA, never crash or hang."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from analysis_worker.analysis import AnalysisError, InvalidMediaError, MediaIOError, PyAVAnalyzer
from localinfra.media import (
    VideoInfo,
    make_audio_only,
    make_corrupt_file,
    make_damaged_copy,
    make_truncated_copy,
)

BadFile = Callable[[Path, VideoInfo], Path]

BAD_FILES: dict[str, BadFile] = {
    "garbage": lambda d, _v: make_corrupt_file(d / "garbage.mp4", 4096),
    "empty": lambda d, _v: make_corrupt_file(d / "empty.mp4", 0),
    "audio_only": lambda d, _v: make_audio_only(d / "sound.m4a"),
    "truncated_header": lambda d, v: make_truncated_copy(v.path, d / "head.mp4", 40),
    "truncated_half": lambda d, v: make_truncated_copy(
        v.path, d / "half.mp4", v.path.stat().st_size // 2
    ),
    "no_decodable_frames": lambda d, v: make_damaged_copy(v.path, d / "zeroed.mp4"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("stage", ["quick", "deep"])
def test_undecodable_files_are_invalid_media(
    kind: str, stage: str, static_video: VideoInfo, tmp_path: Path
) -> None:
    path = BAD_FILES[kind](tmp_path, static_video)
    analyzer = PyAVAnalyzer()
    out = tmp_path / "out"

    with pytest.raises(InvalidMediaError) as info:
        if stage == "quick":
            analyzer.quick(path, out)
        else:
            analyzer.deep(path, out, lambda _f: None, lambda: False)

    err = info.value
    assert isinstance(err, AnalysisError)
    assert err.code == "INVALID_MEDIA" and err.retryable is False
    assert path.name in err.message  # tells a person which file is wrong
    assert not list(out.glob("*.jpg")) and not (out / "signal.json").exists()


def test_missing_file_is_a_retryable_io_error(tmp_path: Path) -> None:
    with pytest.raises(MediaIOError) as info:
        PyAVAnalyzer().quick(tmp_path / "gone.mp4", tmp_path)

    assert info.value.code == "MEDIA_IO" and info.value.retryable is True
    assert not isinstance(info.value, InvalidMediaError)


@pytest.mark.parametrize("stage", ["quick", "deep"])
def test_unusable_output_directory_is_a_retryable_io_error(
    stage: str, static_video: VideoInfo, tmp_path: Path
) -> None:
    out = tmp_path / "occupied"
    out.write_text("a file where the output directory should be")
    analyzer = PyAVAnalyzer()

    with pytest.raises(MediaIOError) as info:
        if stage == "quick":
            analyzer.quick(static_video.path, out)
        else:
            analyzer.deep(static_video.path, out, lambda _f: None, lambda: False)

    assert info.value.retryable is True and str(out) in info.value.message
