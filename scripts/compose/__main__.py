"""`python -m scripts.compose up|down` (`make compose-up`, `make compose-down`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scripts.compose import ComposeError
from scripts.compose.docker import (
    Daemon,
    ensure_installed,
    image_environment,
    say,
    stop_started_daemon,
)
from scripts.compose.stack import Stack


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.compose")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build, start detached, wait until healthy")
    up.add_argument("--job-services", type=int, default=1)
    up.add_argument("--workers", type=int, default=2)
    down = sub.add_parser("down", help="stop the stack (volumes kept unless -v)")
    down.add_argument("-v", "--volumes", action="store_true", help="also delete the data")
    args = parser.parse_args(argv)
    try:
        ensure_installed()
        if args.command == "up":
            Daemon.ensure()
            stack = Stack(image_environment())
            took = stack.up(
                scale={"job-service": args.job_services, "analysis-worker": args.workers}
            )
            print(banner(stack, took), flush=True)
        else:
            if not _daemon_or_none():
                say("no Docker daemon answers: nothing is running")
                return 0
            Stack(image_environment()).down(volumes=args.volumes)
            say(
                "stack stopped"
                + (
                    " and its volumes deleted"
                    if args.volumes
                    else " (data kept in volumes; `-v` deletes it)"
                )
            )
            if stop_started_daemon():
                say("stopped the dockerd that compose-up started")
    except ComposeError as exc:
        print(f"compose: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compose: interrupted", file=sys.stderr)
        return 130
    return 0


def _daemon_or_none() -> bool:
    from scripts.compose.docker import daemon_answers

    return daemon_answers()


def banner(stack: Stack, took: float) -> str:
    rule = "=" * 100
    ports = ", ".join(
        sorted(
            c.published["50051/tcp"]
            for c in stack.containers()
            if c.service == "job-service" and "50051/tcp" in c.published
        )
    )
    return "\n".join(
        [
            rule,
            f"  The job pipeline runs in Docker (project {stack.project}, "
            f"healthy after {took:.0f} s).",
            "",
            f"  job-service gRPC  {ports}   (plaintext on localhost, authentication on)",
            "  S3 (SeaweedFS)    http://127.0.0.1:8333   bucket videos, access key devaccess, "
            "secret devsecret",
            "  images            " + ", ".join(f"{k} {v}" for k, v in stack.image_sizes().items()),
            "",
            "  Tokens (one per audience; jobctl and make demo read them), paste:",
            *[f"    {line}" for line in stack.exports()],
            "",
            "  Try it:  make demo      .venv/bin/jobctl stats      make compose-down",
            f"  Logs:    docker-compose -p {stack.project} logs -f job-service analysis-worker",
            rule,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
