"""A separate uploading process for the resume test: `python -m tests.support.upload_child
ADDRESS FILE STATE_DIR [--stop-after N] [--resume]` uploads FILE with jobs_client (one part at
a time) and prints `job <id>` once, `part <n>` for every part it sent, then `done <id> <status>`.
With --stop-after N it stops dead after its N-th part (holding its event loop) until killed."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

from jobs.v1 import jobs_pb2 as pb

from jobs_client import JobsClient, UploadProgress
from tests.support import auth


async def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("file", type=Path)
    p.add_argument("state_dir", type=Path)
    p.add_argument("--stop-after", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    sent = 0
    announced = False

    def progress(event: UploadProgress) -> None:
        nonlocal sent, announced
        if not announced:
            print(f"job {event.job_id}", flush=True)
            announced = True
        if event.part_number is None:
            return
        sent += 1
        print(f"part {event.part_number}", flush=True)
        if sent == args.stop_after:
            threading.Event().wait()  # frozen mid-upload, as a crashed process; killed by the test

    # The test's uploader (tests/support/auth.py): the parent reads the job as the same subject.
    async with JobsClient.connect(args.address, tokens=auth.tokens_by_role()) as client:
        job = await client.upload_file(
            args.file,
            "video/mp4",
            progress=progress,
            resume=args.resume,
            state_dir=args.state_dir,
            concurrency=1,
        )
    print(f"done {job.job_id} {pb.JobStatus.Name(job.status)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
