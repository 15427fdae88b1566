"""Images in an S3 bucket (AWS or any S3-compatible store), through boto3."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from serve_app.settings import ServiceSettings
from serve_app.storage.base import StorageError

logger = logging.getLogger(__name__)

_PROBE_KEY = ".flux-serve-write-check"


def _reason(error: Exception) -> str:
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        return f"{details.get('Code', 'error')}: {details.get('Message', '')}".rstrip(": ")
    return str(error)


def s3_client(settings: ServiceSettings) -> Any:
    """A boto3 S3 client for the deployment's endpoint, region and retries.

    A session of its own: the default session caches credentials process-wide. Credentials come
    from boto3's standard chain (environment, profile, instance role), never from requests.
    """
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
        s3={"addressing_style": settings.s3_addressing_style},
        signature_version="s3v4",
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.session.Session().client(
        "s3",
        region_name=settings.s3_region,
        endpoint_url=settings.s3_endpoint_url,
        config=config,
    )


class S3ImageStore:
    """Objects under a prefix in one bucket; URLs are presigned or public.

    No ACLs are sent: buckets with owner-enforced ownership refuse them.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        assert settings.s3_bucket is not None  # guaranteed by the settings' validation
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.settings = settings
        self.client = s3_client(settings)

    def object_key(self, key: str) -> str:
        """The bucket key of an image key."""
        return f"{self.prefix}{key}"

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in {"404", "NoSuchBucket"}:
                raise StorageError(f"bucket {self.bucket!r} does not exist") from error
            if code in {"403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}:
                raise StorageError(
                    f"bucket {self.bucket!r}: access denied ({_reason(error)}); check the "
                    "credentials and the bucket policy"
                ) from error
            raise StorageError(f"bucket {self.bucket!r} can't be read: {_reason(error)}") from error
        except BotoCoreError as error:
            raise StorageError(f"bucket {self.bucket!r} can't be reached: {error}") from error
        try:
            # Reading is not writing: only a write shows that uploads will work.
            self.client.put_object(Bucket=self.bucket, Key=self.object_key(_PROBE_KEY), Body=b"")
        except (BotoCoreError, ClientError) as error:
            raise StorageError(
                f"bucket {self.bucket!r} can't be written: {_reason(error)}"
            ) from error

    def put(self, key: str, data: bytes, content_type: str) -> None:
        conditions = {"IfNoneMatch": "*"} if self.settings.s3_conditional_writes else {}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.object_key(key),
                Body=data,
                ContentType=content_type,
                **conditions,
            )
        except ClientError as error:
            # Keys are unique per request, so an existing object is this very image, written by
            # an earlier attempt whose answer was lost: it is stored.
            if error.response.get("Error", {}).get("Code") == "PreconditionFailed":
                return
            raise StorageError(
                f"s3://{self.bucket}/{self.object_key(key)}: {_reason(error)}"
            ) from error
        except BotoCoreError as error:
            raise StorageError(
                f"s3://{self.bucket}/{self.object_key(key)}: {_reason(error)}"
            ) from error

    def url(self, key: str, request_base_url: str) -> str:  # noqa: ARG002
        object_key = self.object_key(key)
        if self.settings.s3_url_mode == "presigned":
            return str(
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": object_key},
                    ExpiresIn=self.settings.s3_presign_expires_s,
                )
            )
        return f"{self._public_base()}/{quote(object_key)}"

    def _public_base(self) -> str:
        if self.settings.public_base_url:
            return self.settings.public_base_url.rstrip("/")
        if self.settings.s3_endpoint_url:
            return f"{self.settings.s3_endpoint_url.rstrip('/')}/{self.bucket}"
        region = self.client.meta.region_name
        return f"https://{self.bucket}.s3.{region}.amazonaws.com"
