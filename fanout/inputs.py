"""Inputs a chunk reads: local paths and ``s3://`` URLs (``ctx.list`` / ``ctx.open``)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO, cast


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"not an s3:// URL with a bucket: {url!r}")
    return bucket, key


def _owner(bucket: str) -> dict[str, str]:
    # A URL into the stack's own bucket passes ExpectedBucketOwner, like the store.
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.store import owner_args

    return owner_args(AwsSettings.from_env(), bucket)


def _s3() -> Any:
    # Imported here: an ETL job reading local files never pays for boto3. The
    # shared client retries throttling and transient errors and honours the
    # standard AWS environment (region, AWS_ENDPOINT_URL, profiles).
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.clients import client

    return client("s3", AwsSettings.from_env())


def list_inputs(prefix: str) -> list[str]:
    """Files under a local directory (recursively) or objects under an ``s3://``
    prefix, sorted. A local path naming one file lists that file."""
    if prefix.startswith("s3://"):
        bucket, key = _split_s3(prefix)
        paginator = _s3().get_paginator("list_objects_v2")
        return sorted(
            f"s3://{bucket}/{obj['Key']}"
            for page in paginator.paginate(Bucket=bucket, Prefix=key, **_owner(bucket))
            for obj in page.get("Contents", ())
        )
    path = Path(prefix.removeprefix("file://")).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise FileNotFoundError(f"input {prefix} does not exist")
    found: list[str] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(found)


class _S3Body(io.RawIOBase):
    """An S3 object's streaming body as a raw stream. botocore's own body iterates
    in 1 KiB blocks, not lines (unlike a file, and only outside ``with``):
    wrapped in a buffered reader it behaves as ``open(path, "rb")`` does."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def open_input(url: str) -> BinaryIO:
    """A binary file object for a local path or an ``s3://`` URL; either iterates
    by line, inside ``with`` or not."""
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        body = _s3().get_object(Bucket=bucket, Key=key, **_owner(bucket))["Body"]
        return cast(BinaryIO, io.BufferedReader(_S3Body(body), buffer_size=1024 * 1024))
    return open(Path(url.removeprefix("file://")).expanduser(), "rb")
