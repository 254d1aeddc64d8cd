"""One log format for both services: a JSON object per line (or readable text at a desk).

Every JSON line has `ts`, `level`, `service`, `logger` and `msg`; anything passed in `extra=`
becomes a top-level field, so a line about a job carries `job_id` (and `worker_id`, `attempt`
where known) and a log pipeline can follow one job across the services.

Stdlib logging plus this formatter rather than structlog: every library we use (grpc, botocore,
SQLAlchemy, alembic) logs through the stdlib already, so their lines come out in the same
format without a bridge, and neither service gains a dependency for ~80 lines.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
# Libraries that log credential lookups and retries at INFO/DEBUG: kept out of job logs.
_NOISY = ("botocore", "aiobotocore", "aioboto3", "urllib3")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON line: ts, level, service, logger, msg, the extras, and exc with a traceback."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, still showing the extras as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        if not extras:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} {extras}{sep}{tail}"


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Installs one stderr handler on the root logger (called once, from main()).

    `fmt` is "json" or "text" (anything but "json" gives text).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
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
