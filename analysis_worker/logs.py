"""Structured logs: one JSON object per line, with `job_id` and `worker_id` on every job line.

Stdlib logging plus a small formatter rather than a logging dependency: anything passed in
`extra=` becomes a top-level field, so a log pipeline can filter one job's story across workers.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, event, the extras, and exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, still showing the extras as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRS and not key.startswith("_")
        )
        if not extras:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} {extras}{sep}{tail}"


def configure_logging(level: str, fmt: Literal["json", "text"]) -> None:
    """Installs one stderr handler on the root logger (called once, from main())."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # botocore logs credentials lookups and retries at INFO/DEBUG: keep them out of job logs.
    for noisy in ("botocore", "aiobotocore", "aioboto3", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one job: every line carries job_id and worker_id.

    Unlike the stdlib adapter on 3.11, `extra=` given at the call is merged, not dropped.
    """

    def __init__(self, logger: logging.Logger, *, job_id: str, worker_id: str) -> None:
        super().__init__(logger, {"job_id": job_id, "worker_id": worker_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        base: Mapping[str, object] = self.extra or {}
        kwargs["extra"] = {**base, **kwargs.get("extra", {})}
        return msg, kwargs
