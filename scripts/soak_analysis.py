"""Does the analysis leak? Run quick + deep passes in-process for a while and sample RSS.

    .venv/bin/python -m scripts.soak_analysis --minutes 30 --out .bench/soak

Runs the passes the way the worker does (in a thread pool, one job at a time per thread) over a
rotating set of small generated clips of several sizes and kinds, and samples the process's RSS
every few seconds. Prints the RSS after warm-up, at the end, and the slope over the second half
of the run (MiB per 10 minutes): a leak shows as a steady slope, a process that has levelled off
as a slope near zero. ``--tracemalloc`` also prints the top Python allocation sites growing
between the warm-up and the end (slower; Python objects only -- FFmpeg's own buffers are C).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis_worker.analysis import PyAVAnalyzer  # noqa: E402
from localinfra.media import make_video  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def make_clips(where: Path) -> list[Path]:
    """Small clips like the demo's uploads: several sizes, cuts, motion, one with audio."""
    specs = [
        (160, 120, [(1.0, "moving"), (0.5, "white"), (1.0, "still")], False),
        (320, 240, [(0.5, "red"), (1.0, "moving"), (0.5, "blue")], True),
        (640, 360, [(1.0, "still"), (1.0, "moving")], False),
        (1280, 720, [(0.5, "moving"), (0.5, "gray")], False),
    ]
    return [
        make_video(where / f"clip{k}.mp4", width=w, height=h, scenes=s, audio=a).path
        for k, (w, h, s, a) in enumerate(specs)
    ]


def one_job(analyzer: PyAVAnalyzer, clip: Path, work: Path) -> None:
    out = Path(tempfile.mkdtemp(dir=work))
    try:
        analyzer.quick(clip, out)
        analyzer.deep(clip, out, lambda _f: None, lambda: False)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2, help="executor threads, as the worker")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "soak")
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    samples: list[tuple[float, int, float]] = []
    try:
        clips = make_clips(work)
        analyzer = PyAVAnalyzer()
        if args.tracemalloc:
            tracemalloc.start(10)
        start = time.monotonic()
        end = start + args.minutes * 60
        jobs = 0
        warm_snapshot = None
        next_sample = start
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            while time.monotonic() < end:
                batch = [
                    pool.submit(one_job, analyzer, clips[(jobs + k) % len(clips)], work)
                    for k in range(args.threads)
                ]
                for f in batch:
                    f.result()
                jobs += len(batch)
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((round(now - start, 1), jobs, round(rss_mib(), 2)))
                    next_sample = now + args.sample_every
                    if (
                        args.tracemalloc
                        and warm_snapshot is None
                        and now - start >= args.warmup_minutes * 60
                    ):
                        warm_snapshot = tracemalloc.take_snapshot()
        samples.append((round(time.monotonic() - start, 1), jobs, round(rss_mib(), 2)))
        if args.tracemalloc and warm_snapshot is not None:
            top = tracemalloc.take_snapshot().compare_to(warm_snapshot, "lineno")[:10]
            print("tracemalloc, growth since warm-up:")
            for stat in top:
                print(f"  {stat}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    (args.out / "rss.json").write_text(json.dumps(samples))
    warm = [s for s in samples if s[0] >= args.warmup_minutes * 60] or samples
    half = [s for s in warm if s[0] >= (warm[0][0] + warm[-1][0]) / 2] or warm
    slope = 0.0
    if len(half) > 1 and half[-1][0] > half[0][0]:
        # least-squares slope, MiB per 10 minutes
        n = len(half)
        mt = sum(s[0] for s in half) / n
        mr = sum(s[2] for s in half) / n
        num = sum((s[0] - mt) * (s[2] - mr) for s in half)
        den = sum((s[0] - mt) ** 2 for s in half)
        slope = num / den * 600 if den else 0.0
    # Max RSS per fifth of the run: a leak climbs window after window, a process that has
    # levelled off repeats the same peak (trimmed RSS dips between jobs, so peaks, not means).
    span = samples[-1][0] / 5 or 1.0
    peaks = [
        max((s[2] for s in samples if k * span <= s[0] <= (k + 1) * span), default=0.0)
        for k in range(5)
    ]
    print("RSS peak per fifth of the run (MiB): " + ", ".join(f"{p:.1f}" for p in peaks))
    print(
        f"jobs {samples[-1][1]} in {samples[-1][0]:.0f} s; RSS start {samples[0][2]:.1f} MiB, "
        f"after warm-up {warm[0][2]:.1f}, max {max(s[2] for s in samples):.1f}, "
        f"end {samples[-1][2]:.1f}; second-half slope {slope:+.2f} MiB/10 min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
