"""`python -m scripts.devstack` (`make run`): see the package docstring."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from localinfra.postgres import PostgresError
from localinfra.s3 import S3ServerError
from scripts.devstack import StackError
from scripts.devstack.console import Console
from scripts.devstack.options import parse_args
from scripts.devstack.signals import Interrupted, Signals
from scripts.devstack.stack import Stack


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    console = Console(
        sys.stdout,
        ["devstack", "job-service", *(f"worker-{i}" for i in range(1, opts.workers + 1))],
    )
    signals = Signals()
    signals.install()
    stack = Stack(opts, console, signals)
    code = 1
    try:
        stack.start()
        console.block(stack.banner())
        code = stack.supervise()
    except Interrupted as exc:
        console.say(f"{exc}: stopping")
        code = 0
    except (StackError, PostgresError, S3ServerError) as exc:
        console.say(f"error: {exc}")
    finally:
        stack.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
