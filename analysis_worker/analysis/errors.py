"""Errors raised by analyzers.

The worker turns these into a job outcome without knowing which plug-in raised them, so every
error carries a stable machine-readable ``code`` and says whether running the same job again
could succeed (``retryable``). Anything else escaping an analyzer is a bug in the analyzer.
"""

from __future__ import annotations


class AnalysisError(Exception):
    """Base class: a failure the worker can report on the job instead of crashing."""

    code: str = "ANALYSIS_FAILED"
    retryable: bool = False

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        # Instance attributes shadow the class defaults so a caller may refine them, while the
        # subclasses below keep fixed values without each needing an __init__.
        self.code = code if code is not None else type(self).code
        self.retryable = retryable if retryable is not None else type(self).retryable

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidMediaError(AnalysisError):
    """The file is not a decodable video; retrying the same bytes can never succeed."""

    code = "INVALID_MEDIA"
    retryable = False


class MediaIOError(AnalysisError):
    """Local file I/O failed: the input is missing or unreadable, or an output could not be
    written (disk full, permissions). The media itself may be fine, so a retry can succeed."""

    code = "MEDIA_IO"
    retryable = True


class AnalysisAborted(AnalysisError):
    """The caller asked the pass to stop (shutdown or cancellation) via ``should_stop``.

    Retryable because nothing is wrong with the media: a worker that does not special-case
    aborts will hand the job back rather than fail it.
    """

    code = "ABORTED"
    retryable = True
