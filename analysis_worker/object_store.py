"""S3 for the worker: download the verified upload, upload the results.

The download reads with `If-Match: <lease etag>` so the bytes analysed are exactly the ones the
job-service verified — a presigned PUT URL stays valid after verification, so the object can be
overwritten. It streams to disk in chunks (videos do not fit in memory) and hashes the chunks as
it writes them, so the SHA-256 the uploader declared (`Lease.sha256`) is checked on the whole
object without a second read: S3 holds no whole-object SHA-256 for a multipart upload, only
the per-part ones the service checked. S3 failures become `ObjectStoreError`s that say whether
retrying can help, which is all the worker needs to decide between a retryable and a final
FailJob — and whose fault it is: `infrastructure` errors (S3 5xx, timeouts, refused
connections, 403 for our own credentials) say nothing about the job, so the worker retries them
inside the lease and never lets them spend the job's attempts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import mimetypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from jobs.v1 import jobs_pb2

from analysis_worker.codes import (
    DOWNLOAD_FAILED,
    RESULTS_UPLOAD_FAILED,
    STORAGE_ACCESS_DENIED,
    UPLOAD_CHANGED,
    UPLOAD_MISSING,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_CHANGED_CODES = frozenset({"412", "PreconditionFailed"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "Forbidden"})


# Codes that mean "S3, or our access to it, is in trouble" rather than "this job is broken".
INFRASTRUCTURE_CODES = frozenset({DOWNLOAD_FAILED, STORAGE_ACCESS_DENIED, RESULTS_UPLOAD_FAILED})


class ObjectStoreError(Exception):
    """An S3 failure, with the job error code to report and whether a retry can help.

    `infrastructure`: the failure is S3's or our credentials', not the job's; it is retried
    inside the lease and, if that does not cure it, reported as FAILURE_KIND_INFRASTRUCTURE.
    """

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.infrastructure = code in INFRASTRUCTURE_CODES


class ObjectStore:
    """Job-scoped S3 operations on an aioboto3 S3 client that main() owns (and closes).

    The client is typed `Any`: aioboto3 generates its methods at runtime and ships no stubs.
    """

    def __init__(self, s3_client: Any, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._s3 = s3_client
        self._chunk_bytes = chunk_bytes

    async def download(self, lease: jobs_pb2.Lease, dest: Path) -> int:
        """Streams `bucket/key` to `dest` and returns the byte count.

        The chunks are SHA-256 hashed as they are written; when the lease carries the declared
        digest (`lease.sha256`, the raw 32 bytes; empty when none was declared) the download
        must match it.

        Raises ObjectStoreError: UPLOAD_MISSING (404, final), UPLOAD_CHANGED (412, size or
        SHA-256 mismatch: not the bytes verified or declared, final), STORAGE_ACCESS_DENIED
        (403, a configuration fault: infrastructure), DOWNLOAD_FAILED (network, timeout, 5xx:
        infrastructure).
        """
        params: dict[str, str] = {"Bucket": lease.bucket, "Key": lease.key}
        if lease.etag:
            params["IfMatch"] = lease.etag
        try:
            response = await self._s3.get_object(**params)
            written, digest = await self._stream_to_file(response["Body"], dest)
        except ClientError as exc:
            raise _download_error(exc, lease) from exc
        except (TimeoutError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            # aiohttp errors (e.g. a payload cut short) can surface unwrapped by botocore.
            raise ObjectStoreError(
                DOWNLOAD_FAILED, f"reading s3://{lease.bucket}/{lease.key}: {exc!r}", retryable=True
            ) from exc
        if lease.size_bytes and written != lease.size_bytes:
            raise ObjectStoreError(
                UPLOAD_CHANGED,
                f"s3://{lease.bucket}/{lease.key} has {written} bytes, "
                f"{lease.size_bytes} were verified",
                retryable=False,
            )
        if lease.sha256 and digest != lease.sha256:
            raise ObjectStoreError(
                UPLOAD_CHANGED,
                f"s3://{lease.bucket}/{lease.key} has SHA-256 {digest.hex()}, "
                f"{lease.sha256.hex()} was declared",
                retryable=False,
            )
        return written

    def results_uri(self, lease: jobs_pb2.Lease) -> str:
        """`s3://bucket/<results_prefix>`: where this lease's results go."""
        return f"s3://{lease.bucket}/{_results_prefix(lease)}"

    def object_uri(self, lease: jobs_pb2.Lease, name: str) -> str:
        """The URI a result file called `name` gets under the results prefix."""
        return f"s3://{lease.bucket}/{_results_key(lease, name)}"

    async def upload_thumbnails(
        self, lease: jobs_pb2.Lease, thumbnails: Sequence[Path]
    ) -> list[str]:
        """Uploads the quick pass's thumbnails under `<results_prefix>thumbnails/`.

        Done right after the quick pass, so a job resumed at the deep pass by another worker
        still has them. Returns their s3:// URIs.
        """
        uris = []
        for path in thumbnails:
            key = _results_key(lease, f"thumbnails/{path.name}")
            await self._upload_file(lease.bucket, key, path)
            uris.append(f"s3://{lease.bucket}/{key}")
        return uris

    async def upload_results(
        self, lease: jobs_pb2.Lease, *, signal_file: Path, summary: dict[str, Any]
    ) -> str:
        """Uploads the deep signal file and `results.json`; returns `s3://bucket/prefix/`."""
        await self._upload_file(lease.bucket, _results_key(lease, signal_file.name), signal_file)
        body = json.dumps(summary, indent=2, sort_keys=True).encode()
        key = _results_key(lease, "results.json")
        try:
            await self._s3.put_object(
                Bucket=lease.bucket, Key=key, Body=body, ContentType="application/json"
            )
        except (TimeoutError, ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _upload_error(lease.bucket, key, exc) from exc
        return self.results_uri(lease)

    async def _stream_to_file(self, body: Any, dest: Path) -> tuple[int, bytes]:
        """Writes the body to `dest`; returns the byte count and the SHA-256 of the bytes."""
        written = 0
        hasher = hashlib.sha256()
        handle = await asyncio.to_thread(dest.open, "wb")
        try:
            # Read through aiobotocore's StreamingBody (it checks Content-Length); `async with`
            # only guarantees the connection is released.
            async with body:
                while chunk := await body.read(self._chunk_bytes):
                    # Hash in the thread that writes: a chunk is up to 1 MiB, too long to hash
                    # on the event loop (hashlib releases the GIL for it).
                    await asyncio.to_thread(_write_and_hash, handle, hasher, chunk)
                    written += len(chunk)
        finally:
            await asyncio.to_thread(handle.close)
        return written, hasher.digest()

    async def _upload_file(self, bucket: str, key: str, path: Path) -> None:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            await self._s3.upload_file(
                str(path), bucket, key, ExtraArgs={"ContentType": content_type}
            )
        except (TimeoutError, ClientError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _upload_error(bucket, key, exc) from exc


def _write_and_hash(handle: BinaryIO, hasher: Any, chunk: bytes) -> None:
    handle.write(chunk)
    hasher.update(chunk)


def _results_prefix(lease: jobs_pb2.Lease) -> str:
    prefix = lease.results_prefix or f"results/{lease.job.job_id}/"
    return prefix if prefix.endswith("/") else prefix + "/"


def _results_key(lease: jobs_pb2.Lease, name: str) -> str:
    return _results_prefix(lease) + name


def _download_error(exc: ClientError, lease: jobs_pb2.Lease) -> ObjectStoreError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    where = f"s3://{lease.bucket}/{lease.key}"
    if code in _MISSING_CODES or status == 404:
        return ObjectStoreError(UPLOAD_MISSING, f"{where} does not exist", retryable=False)
    if code in _CHANGED_CODES or status == 412:
        return ObjectStoreError(
            UPLOAD_CHANGED,
            f"{where} no longer has the verified ETag {lease.etag}: overwritten after upload",
            retryable=False,
        )
    if code in _DENIED_CODES or status == 403:
        return ObjectStoreError(
            STORAGE_ACCESS_DENIED, f"{where}: access denied (check credentials)", retryable=True
        )
    return ObjectStoreError(DOWNLOAD_FAILED, f"{where}: {code or status}: {exc}", retryable=True)


def _upload_error(bucket: str, key: str, exc: Exception) -> ObjectStoreError:
    return ObjectStoreError(
        RESULTS_UPLOAD_FAILED, f"writing s3://{bucket}/{key}: {exc}", retryable=True
    )
