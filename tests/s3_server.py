"""A real S3-compatible server for the tests: SeaweedFS (`weed mini`) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from deployments.local_cluster import free_port

from .server_process import ServerProcess

ACCESS_KEY = "flux-test-key"
SECRET_KEY = "flux-test-secret"
REGION = "us-east-1"


@dataclass
class SeaweedS3(ServerProcess):
    """One ``weed mini`` process; it can be stopped and started again on the same data."""

    folder: Path
    port: int = field(default_factory=free_port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.folder / "s3.json"
        # The anonymous identity may read: that is what a public bucket behind a CDN looks like.
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {"name": "anonymous", "actions": ["Read"]},
                    ]
                }
            )
        )
        weed = Path(sys.executable).with_name("weed")
        self.process = subprocess.Popen(
            [
                str(weed),
                "mini",
                f"-dir={self.folder / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.port={self.port}",
                f"-s3.config={config}",
            ],
            stdout=(self.folder / "weed.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.client(max_attempts=1).list_buckets()
                return
            except Exception:  # noqa: BLE001 - any failure means not up yet
                time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS did not start; see {self.folder / 'weed.log'}")

    def client(self, max_attempts: int = 3, **credentials: str) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=credentials.get("access_key", ACCESS_KEY),
            aws_secret_access_key=credentials.get("secret_key", SECRET_KEY),
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
            ),
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))


def credentials_env() -> dict[str, str]:
    """boto3's standard chain reads these: the service never takes credentials from requests."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # No instance-metadata lookups on a machine without a cloud.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def apply_credentials() -> None:
    os.environ.update(credentials_env())
