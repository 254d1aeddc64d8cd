"""The worker's log lines: one JSON object per line (or readable text at a desk), and JobLog.

The format is the pipeline's one log format, also used by the job-service (job_service.logs):
every JSON line has `ts`, `level`, `service`, `logger` and `msg`, and anything passed in
`extra=` becomes a top-level field, so a line about a job carries `job_id` (and `worker_id`,
`attempt` where known). python-json-logger renders it; the two services share no code of ours
(the worker shares only the generated protos with the job-service), only this key schema.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

SERVICE = "analysis-worker"
#: python-json-logger's record fields renamed to the pipeline's keys.
KEYS = {"levelname": "level", "name": "logger", "message": "msg", "exc_info": "exc"}
# Libraries that log credential lookups and retries at INFO/DEBUG: kept out of job logs.
_NOISY = ("botocore", "aiobotocore", "aioboto3", "urllib3")
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, still showing the extras as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        head, sep, tail = super().format(record).partition("\n")
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD)
        return f"{head} {extras}{sep}{tail}" if extras else f"{head}{sep}{tail}"


def json_formatter(service: str = SERVICE) -> logging.Formatter:
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields=KEYS,
        static_fields={"service": service},
        timestamp="ts",
    )


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """One stderr handler on the root logger (called once, from main()); `fmt` "json" or
    "text"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one job: every line carries job_id and worker_id (and the attempt).

    Unlike the stdlib adapter on 3.11, `extra=` given at the call is merged, not dropped.
    """

    def __init__(
        self, logger: logging.Logger, *, job_id: str, worker_id: str, attempt: int | None = None
    ) -> None:
        bound: dict[str, object] = {"job_id": job_id, "worker_id": worker_id}
        if attempt is not None:
            bound["attempt"] = attempt
        super().__init__(logger, bound)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        base: Mapping[str, object] = self.extra or {}
        kwargs["extra"] = {**base, **kwargs.get("extra", {})}
        return msg, kwargs
