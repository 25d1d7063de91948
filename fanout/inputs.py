"""Inputs a chunk reads: local paths and ``s3://`` URLs (``ctx.list`` / ``ctx.open``)."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, cast

from fanout.errors import PermanentError


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
        return [_named(str(path))]
    if not path.is_dir():
        raise FileNotFoundError(f"input {prefix} does not exist")
    return sorted(_walk(path))


def _walk(top: Path) -> list[str]:
    """The regular files under ``top`` (not dot-files, nor what is under a
    dot-directory), links to directories followed once each. A directory that
    cannot be read is an error, not a part of the input left out: a run
    "succeeded" without it. A FIFO or a socket is no input (reading one waited
    out the chunk's timeout)."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()

    def refuse(exc: OSError) -> None:
        raise exc

    for root, dirs, files in os.walk(top, onerror=refuse, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree: walked already
            dirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        # Dot-directories left out as dot-files are (a .git/ or .cache/ among
        # the inputs was listed, file by file).
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            full = os.path.join(root, name)
            if name.startswith(".") or not _regular(full):
                continue
            found.append(_named(full))
    return found


def _regular(path: str) -> bool:
    """A regular file, or a link to one (a broken link too: reading it says why)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _named(path: str) -> str:
    """``path``, refused if its name is not UTF-8: no chunk payload can carry
    it (JSON), and the plan died naming no file."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise PermanentError(
            f"input {shown} has a name that is not UTF-8: rename it (no chunk can name it)"
        ) from None
    return path


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
