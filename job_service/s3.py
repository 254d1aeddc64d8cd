"""S3 adapter: presigned PUT URLs and the HeadObject preflight, with S3's failure modes mapped
to domain outcomes. Only a 404 means "no such object"; a 403 is our configuration fault and a
timeout or 5xx says nothing about the object, so neither may fail a job."""

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
from job_service.domain.errors import StorageAccessDenied, StorageUnavailable
from job_service.domain.model import ObjectInfo

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
            resp = await self._client.head_object(Bucket=bucket, Key=key)
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
                raise StorageAccessDenied(
                    f"S3 refused the upload check ({code or status}): the job-service's S3 "
                    "credentials lack access (they need s3:GetObject and s3:ListBucket on "
                    f"{bucket}); the job was not changed, retry once that is fixed",
                    bucket=bucket,
                ) from exc
            raise StorageUnavailable(
                f"S3 answered {code or status} to the upload check; the job was not changed, "
                "retry later",
                bucket=bucket,
            ) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(
                f"S3 could not be reached for the upload check ({type(exc).__name__}); the job "
                "was not changed, retry later",
                bucket=bucket,
            ) from exc
        etag = str(resp.get("ETag", "")).strip('"')
        return ObjectInfo(
            size=int(resp.get("ContentLength", 0)),
            etag=etag,
            content_type=resp.get("ContentType"),
        )

    async def presign_put(
        self, bucket: str, key: str, content_type: str, expires_in: timedelta
    ) -> tuple[str, dict[str, str]]:
        url: str = await self._signer.generate_presigned_url(
            "put_object",
            Params={"Bucket": bucket, "Key": key, "ContentType": content_type},
            ExpiresIn=int(expires_in.total_seconds()),
            HttpMethod="PUT",
        )
        return url, {"Content-Type": content_type}

    async def bucket_exists(self, bucket: str) -> bool:
        """Start-up check: a missing bucket would make every upload look missing."""
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return False
            raise StorageUnavailable(f"S3 HeadBucket on {bucket} failed: {exc}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"S3 unreachable: {type(exc).__name__}: {exc}") from exc
        return True

    # --- retention (edge helper): results of purged jobs -------------------------------------

    async def delete_prefix(self, bucket: str, prefix: str, *, dry_run: bool = False) -> int:
        """Delete every object under `prefix` (with dry_run: only count them); returns how
        many. Raises StorageUnavailable / StorageAccessDenied; what was deleted stays deleted
        (a later call finishes the rest)."""
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
                        raise StorageUnavailable(
                            f"S3 did not delete {first.get('Key')} under s3://{bucket}/{prefix} "
                            f"({first.get('Code')}); retry later",
                            bucket=bucket,
                        )
                count += len(keys)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            cls = StorageAccessDenied if code in _DENIED or status == 403 else StorageUnavailable
            raise cls(
                f"S3 answered {code or status} while deleting s3://{bucket}/{prefix}; retry later",
                bucket=bucket,
            ) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(
                f"S3 could not be reached to delete s3://{bucket}/{prefix} "
                f"({type(exc).__name__}); retry later",
                bucket=bucket,
            ) from exc
        return count
