"""Moving bytes to S3: streamed HTTP PUTs of a whole file or of one part (in worker threads,
from disk, so memory stays at one block per transfer), hashing, and the resume state file."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

BLOCK_BYTES = 1024 * 1024
STATE_VERSION = 1


class PutRefused(Exception):
    """S3 answered the PUT with an error status."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        self.status, self.reason, self.body = status, reason, body
        super().__init__(f"HTTP {status} {reason}: {body}")

    @property
    def s3_code(self) -> str:
        start = self.body.find("<Code>")
        end = self.body.find("</Code>")
        return self.body[start + 6 : end] if 0 <= start < end else ""


def sha256_of(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    """SHA-256 of `length` bytes at `offset` (the rest of the file when None), streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(BLOCK_BYTES if left is None else min(BLOCK_BYTES, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.digest()


class _Slice:
    """A file window that http.client streams from; each read reports its bytes."""

    def __init__(self, f: IO[bytes], length: int, sent: Callable[[int], None]) -> None:
        self._f, self._left, self._sent = f, length, sent

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        chunk = self._f.read(n)
        self._left -= len(chunk)
        self._sent(len(chunk))
        return chunk


def put_range(
    url: str,
    headers: dict[str, str],
    path: Path,
    offset: int,
    length: int,
    sent: Callable[[int], None],
    timeout: float,
) -> str:
    """PUT `length` bytes of `path` at `offset` with exactly `headers` (plus Content-Length);
    returns the ETag. Raises PutRefused (HTTP error) or OSError (network)."""
    parts = urllib.parse.urlsplit(url)
    conn_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_class(parts.netloc, timeout=timeout, blocksize=BLOCK_BYTES)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        with path.open("rb") as f:
            f.seek(offset)
            body = _Slice(f, length, sent)
            # An explicit type: without one some servers (moto's werkzeug) parse the body as a
            # form. For a single PUT the signed Content-Type in `headers` wins.
            conn.request(
                "PUT",
                target,
                body=body,
                headers={
                    "Content-Type": "application/octet-stream",
                    **headers,
                    "Content-Length": str(length),
                },
            )
            resp = conn.getresponse()
            answer = resp.read(2000).decode(errors="replace")
            if not 200 <= resp.status < 300:
                raise PutRefused(resp.status, resp.reason, " ".join(answer.split()))
            return str(resp.getheader("ETag", "")).strip('"')
    finally:
        conn.close()


@dataclasses.dataclass
class UploadState:
    """What a later run needs to resume: the same request_id returns the same job and plan,
    and ListUploadedParts tells which parts S3 already holds. One file per (file path,
    request_id), so concurrent uploads of one file never share a state file; a resume takes the
    newest one of the path. Valid only while the file's size and mtime are unchanged."""

    path: str
    size: int
    mtime_ns: int
    request_id: str
    sha256_hex: str
    job_id: str = ""
    version: int = STATE_VERSION

    @staticmethod
    def _path_key(path: Path) -> str:
        return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]

    def file(self, state_dir: Path) -> Path:
        upload = hashlib.sha256(self.request_id.encode()).hexdigest()[:16]
        return state_dir / f"{self._path_key(Path(self.path))}.{upload}.json"

    @classmethod
    def load(cls, state_dir: Path, path: Path) -> UploadState | None:
        """The newest saved state of `path` that still matches the file, or None."""
        st = path.stat()
        candidates = []
        for file in state_dir.glob(f"{cls._path_key(path)}.*.json"):
            try:
                state = cls(**json.loads(file.read_text()))
                saved_at = file.stat().st_mtime_ns
            except (OSError, ValueError, TypeError):
                continue  # removed meanwhile by a finished upload, or not ours
            if (state.version, state.size, state.mtime_ns) == (
                STATE_VERSION,
                st.st_size,
                st.st_mtime_ns,
            ):
                candidates.append((saved_at, state))
        return max(candidates, key=lambda c: c[0])[1] if candidates else None

    @classmethod
    def prepare(
        cls, state_dir: Path, path: Path, request_id: str | None, resume: bool
    ) -> UploadState:
        """The saved state of an interrupted upload of this file (resume), or a new one with
        the file's SHA-256 (one streamed read) and `request_id` (else a fresh one). Not saved:
        reading the video and writing the state fail for different reasons."""
        state = cls.load(state_dir, path) if resume else None
        if state is None:
            st = path.stat()
            state = cls(
                path=str(path.resolve()),
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                request_id=request_id or str(uuid.uuid4()),
                sha256_hex=sha256_of(path).hex(),
            )
        return state

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        target = self.file(state_dir)
        # A temporary name of its own: two saves of the same state (one request_id, two
        # callers) each replace the target whole, never each other's half-written file.
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(json.dumps(dataclasses.asdict(self)))
            os.replace(tmp, target)  # never a half-written state file
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, state_dir: Path) -> None:
        self.file(state_dir).unlink(missing_ok=True)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jobs-client" / "uploads"
