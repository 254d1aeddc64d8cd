"""S3 adapter: presigned PUT and UploadPart URLs, the multipart calls and the HeadObject
preflight, with S3's failure modes mapped to domain outcomes. Only a 404 means "no such object";
a 403 is our configuration fault and a timeout or 5xx says nothing about the object, so neither
may fail a job. NoSuchUpload means the multipart upload was completed or aborted."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from types import TracebackType
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from job_service.config import Settings
from job_service.domain.errors import ObjectStoreAccessDenied, ObjectStoreUnavailable
from job_service.domain.model import ObjectInfo
from job_service.domain.multipart import PartInfo, b64

log = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def client_config(timeout: float) -> Config:
    return Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": 2, "mode": "standard"},
        # botocore >= 1.36 defaults to "when_supported": it adds CRC32 checksums (and trailers)
        # to every upload and validates every download, which MinIO/SeaweedFS versions refuse.
        # We ask for SHA-256 ourselves where we want one (decisions.md, entry on checksums).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def _code(exc: ClientError) -> tuple[str, object]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code, exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _no_such_upload(exc: ClientError) -> bool:
    code, status = _code(exc)
    return code == "NoSuchUpload" or (status == 404 and code in ("", "404"))


def _object_store_error(exc: Exception, what: str, bucket: str) -> ObjectStoreUnavailable:
    """S3 trouble during `what`, as the domain error the RPC layer maps (nothing changed)."""
    if isinstance(exc, ClientError):
        code, status = _code(exc)
        if code in _DENIED or status == 403:
            log.error(
                "S3 refused %s: check the service's credentials (s3:GetObject, s3:PutObject, "
                "s3:ListBucket, s3:AbortMultipartUpload, s3:ListMultipartUploadParts)",
                what,
                extra={"bucket": bucket, "s3_code": code},
            )
            return ObjectStoreAccessDenied(
                f"S3 refused {what} ({code or status}): the job-service's S3 credentials lack "
                f"access to {bucket}; the job was not changed, retry once that is fixed",
                bucket=bucket,
            )
        return ObjectStoreUnavailable(
            f"S3 answered {code or status} to {what}; the job was not changed, retry later",
            bucket=bucket,
        )
    return ObjectStoreUnavailable(
        f"S3 could not be reached for {what} ({type(exc).__name__}); the job was not changed, "
        "retry later",
        bucket=bucket,
    )


class S3Gateway:
    """Holds two clients for the service's lifetime: one to call S3, one to sign URLs with the
    address clients use (they differ when S3 is reached through another host name)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session = aioboto3.Session(
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            region_name=settings.s3_region,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._signer: Any = None

    async def __aenter__(self) -> S3Gateway:
        cfg = client_config(self._settings.s3_timeout_seconds)
        endpoint = self._settings.s3_endpoint_url or None
        self._client = await self._stack.enter_async_context(
            self._session.client("s3", endpoint_url=endpoint, config=cfg)
        )
        public = self._settings.s3_public_endpoint_url or None
        if public and public != endpoint:
            self._signer = await self._stack.enter_async_context(
                self._session.client("s3", endpoint_url=public, config=cfg)
            )
        else:
            self._signer = self._client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            resp = await self._client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND or status == 404:
                return None
            if code in _DENIED or status == 403:
                log.error(
                    "S3 refused HeadObject: check the service's credentials and that they have "
                    "s3:GetObject and s3:ListBucket on the bucket",
                    extra={"bucket": bucket, "key": key, "s3_code": code},
                )
                raise ObjectStoreAccessDenied(
                    f"S3 refused the upload check ({code or status}): the job-service's S3 "
                    "credentials lack access (they need s3:GetObject and s3:ListBucket on "
                    f"{bucket}); the job was not changed, retry once that is fixed",
                    bucket=bucket,
                ) from exc
            raise ObjectStoreUnavailable(
                f"S3 answered {code or status} to the upload check; the job was not changed, "
                "retry later",
                bucket=bucket,
            ) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise ObjectStoreUnavailable(
                f"S3 could not be reached for the upload check ({type(exc).__name__}); the job "
                "was not changed, retry later",
                bucket=bucket,
            ) from exc
        etag = str(resp.get("ETag", "")).strip('"')
        return ObjectInfo(
            size=int(resp.get("ContentLength", 0)),
            etag=etag,
            content_type=resp.get("ContentType"),
            checksum_sha256=resp.get("ChecksumSHA256") or None,
        )

    async def presign_put(
        self,
        bucket: str,
        key: str,
        content_type: str,
        expires_in: timedelta,
        sha256: bytes | None = None,
    ) -> tuple[str, dict[str, str]]:
        """A PUT URL bound to bucket, key, content type and (given one) the body's SHA-256: the
        checksum headers are signed, so S3 stores the checksum and rejects another body."""
        params: dict[str, object] = {"Bucket": bucket, "Key": key, "ContentType": content_type}
        headers = {"Content-Type": content_type}
        if sha256 is not None:
            params.update(ChecksumSHA256=b64(sha256), ChecksumAlgorithm="SHA256")
            headers.update(_checksum_headers(sha256))
        url: str = await self._signer.generate_presigned_url(
            "put_object",
            Params=params,
            ExpiresIn=int(expires_in.total_seconds()),
            HttpMethod="PUT",
        )
        return url, headers

    async def create_multipart(self, bucket: str, key: str, content_type: str) -> str:
        """Open a multipart upload whose parts carry SHA-256 checksums; returns its upload id."""
        try:
            resp = await self._client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type, ChecksumAlgorithm="SHA256"
            )
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise _object_store_error(exc, "CreateMultipartUpload", bucket) from exc
        return str(resp["UploadId"])

    async def presign_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        sha256: bytes,
        expires_in: timedelta,
    ) -> tuple[str, dict[str, str]]:
        url: str = await self._signer.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": part_number,
                "ChecksumSHA256": b64(sha256),
                "ChecksumAlgorithm": "SHA256",
            },
            ExpiresIn=int(expires_in.total_seconds()),
            HttpMethod="PUT",
        )
        return url, _checksum_headers(sha256)

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[PartInfo] | None:
        """Every part S3 holds (following every page); None when the upload is gone."""
        parts: list[PartInfo] = []
        marker = 0
        try:
            while True:
                resp = await self._client.list_parts(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
                )
                for p in resp.get("Parts", []):
                    parts.append(
                        PartInfo(
                            part_number=int(p["PartNumber"]),
                            size=int(p["Size"]),
                            etag=str(p["ETag"]).strip('"'),
                        )
                    )
                if not resp.get("IsTruncated"):
                    return parts
                marker = int(resp["NextPartNumberMarker"])
        except ClientError as exc:
            if _no_such_upload(exc):
                return None
            raise _object_store_error(exc, "ListParts", bucket) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise _object_store_error(exc, "ListParts", bucket) from exc

    async def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[PartInfo]
    ) -> bool:
        """Assemble the object from `parts`; False when the upload is already gone (completed
        by a concurrent call, or aborted): the caller looks at the object instead."""
        body = {
            "Parts": [
                {"PartNumber": p.part_number, "ETag": f'"{p.etag}"'}
                | ({"ChecksumSHA256": b64(p.sha256)} if p.sha256 else {})
                for p in sorted(parts, key=lambda p: p.part_number)
            ]
        }
        try:
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload=body
            )
        except ClientError as exc:
            if _no_such_upload(exc):
                return False
            raise _object_store_error(exc, "CompleteMultipartUpload", bucket) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise _object_store_error(exc, "CompleteMultipartUpload", bucket) from exc
        return True

    async def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        """Drop the upload and its parts; an upload already gone is fine."""
        try:
            await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if _no_such_upload(exc):
                return
            raise _object_store_error(exc, "AbortMultipartUpload", bucket) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise _object_store_error(exc, "AbortMultipartUpload", bucket) from exc

    async def bucket_exists(self, bucket: str) -> bool:
        """Start-up check: a missing bucket would make every upload look missing."""
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return False
            raise ObjectStoreUnavailable(f"S3 HeadBucket on {bucket} failed: {exc}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise ObjectStoreUnavailable(f"S3 unreachable: {type(exc).__name__}: {exc}") from exc
        return True

    # --- retention (edge helper): results of purged jobs -------------------------------------

    async def delete_prefix(self, bucket: str, prefix: str, *, dry_run: bool = False) -> int:
        """Delete every object under `prefix` (with dry_run: only count them); returns how
        many. Raises ObjectStoreUnavailable / ObjectStoreAccessDenied; what was deleted stays
        deleted (a later call finishes the rest)."""
        if not prefix.endswith("/"):
            raise ValueError(f"refusing to delete under {prefix!r}: not a folder prefix")
        count = 0
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys and not dry_run:
                    resp = await self._client.delete_objects(
                        Bucket=bucket, Delete={"Objects": keys, "Quiet": True}
                    )
                    if resp.get("Errors"):
                        first = resp["Errors"][0]
                        raise ObjectStoreUnavailable(
                            f"S3 did not delete {first.get('Key')} under s3://{bucket}/{prefix} "
                            f"({first.get('Code')}); retry later",
                            bucket=bucket,
                        )
                count += len(keys)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            cls = (
                ObjectStoreAccessDenied
                if code in _DENIED or status == 403
                else ObjectStoreUnavailable
            )
            raise cls(
                f"S3 answered {code or status} while deleting s3://{bucket}/{prefix}; retry later",
                bucket=bucket,
            ) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise ObjectStoreUnavailable(
                f"S3 could not be reached to delete s3://{bucket}/{prefix} "
                f"({type(exc).__name__}); retry later",
                bucket=bucket,
            ) from exc
        return count


def _checksum_headers(sha256: bytes) -> dict[str, str]:
    # Both are signed: x-amz-sdk-checksum-algorithm makes S3 (and moto) store the checksum.
    return {"x-amz-checksum-sha256": b64(sha256), "x-amz-sdk-checksum-algorithm": "SHA256"}
