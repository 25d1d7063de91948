"""The object store on S3: key ``runs/<id>/x.avro`` is ``s3://BUCKET/runs/<id>/x.avro``.

S3 writes are atomic (a reader sees the old object, the new one or none), and
``put(..., if_absent=True)`` is a conditional write (``If-None-Match: *``): of
two concurrent writers exactly one wins. Keys are checked by
:mod:`fanout.backends.keys`, so S3 accepts and rejects the same keys as the
local store. Encryption at rest is the bucket's default (set when the bucket is
created, see :mod:`fanout.backends.aws.resources`), not a per-call argument.

With ``AwsSettings.bucket_owner`` set (the deployed function sets it to its
account), every call passes ``ExpectedBucketOwner``: S3 answers 403 rather than
serve or accept an object of a same-named bucket in another account.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client, error_code
from fanout.backends.keys import check_key, check_prefix

#: File objects up to this size are sent with one ``PutObject``; larger ones in parts.
SINGLE_PUT_BYTES = 16 * 1024 * 1024
#: The part size of a conditional multipart upload (S3's minimum is 5 MiB).
PART_BYTES = 16 * 1024 * 1024

#: Error codes S3 answers for a key that does not exist.
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
#: A concurrent conditional write is in progress: S3 asks to retry.
_CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "409", "OperationAborted"})
CONFLICT_ATTEMPTS = 5


class S3Store:
    """The :class:`~fanout.backends.base.Store` of the AWS backend, on one bucket."""

    def __init__(self, settings: AwsSettings, s3: Any = None) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.s3: Any = s3 if s3 is not None else client("s3", settings)
        #: Passed to every call (see the module docstring); empty when not configured.
        self.owner: dict[str, str] = owner_args(settings)

    # -- write --------------------------------------------------------------------

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> bool:
        """Write the object atomically; with ``if_absent``, only if the key does not
        exist yet (``If-None-Match: *``; a 412 means another writer won).
        Returns whether it wrote.

        A file object is read from its current position; up to 16 MiB it goes in
        one ``PutObject``, beyond that as a multipart upload (also atomic: the
        object appears when the upload completes).
        """
        check_key(key)
        if isinstance(data, bytes | bytearray | memoryview):
            return self._put_bytes(key, bytes(data), if_absent)
        head = data.read(SINGLE_PUT_BYTES + 1)
        if len(head) <= SINGLE_PUT_BYTES:
            return self._put_bytes(key, head, if_absent)
        if not if_absent:
            # s3transfer: parallel parts and its own retries.
            self.s3.upload_fileobj(
                _Prefixed(head, data), self.bucket, key, ExtraArgs=dict(self.owner)
            )
            return True
        # s3transfer cannot send If-None-Match: our own (sequential) multipart upload.
        return self._put_parts_if_absent(key, _Prefixed(head, data))

    def _put_bytes(self, key: str, data: bytes, if_absent: bool) -> bool:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        return self._conditional(
            lambda: self.s3.put_object(
                Bucket=self.bucket, Key=key, Body=data, **extra, **self.owner
            )
        )

    def _conditional(self, write: Any) -> bool:
        """Run ``write``: False on 412 (the key exists), retrying on 409 conflicts."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                write()
                return True
            except Exception as exc:
                code = error_code(exc)
                if code in ("PreconditionFailed", "412"):
                    return False
                if code not in _CONFLICT_CODES or attempt == CONFLICT_ATTEMPTS:
                    raise
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _put_parts_if_absent(self, key: str, data: _Prefixed) -> bool:
        upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key, **self.owner)[
            "UploadId"
        ]
        try:
            parts = []
            number = 1
            while True:
                chunk = _read_full(data, PART_BYTES)
                if not chunk and number > 1:
                    break
                etag = self.s3.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    **self.owner,
                )["ETag"]
                parts.append({"PartNumber": number, "ETag": etag})
                number += 1
            wrote = self._conditional(
                lambda: self.s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                    **self.owner,
                )
            )
        except BaseException:
            self._abort(key, upload_id)
            raise
        if not wrote:
            self._abort(key, upload_id)
        return wrote

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, **self.owner
            )
        except Exception as exc:
            # A lifecycle rule (AbortIncompleteMultipartUpload) cleans up the rest.
            if error_code(exc) != "NoSuchUpload":
                raise

    # -- read ---------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` if missing."""
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        """A binary file object streaming the object (the caller closes it);
        ``KeyError`` if missing."""
        check_key(key)
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=key, **self.owner)
        except Exception as exc:
            if error_code(exc) in MISSING_CODES:
                raise KeyError(key) from None
            raise
        # botocore's StreamingBody is an io.IOBase: read(n), close(), a context manager.
        return cast(BinaryIO, response["Body"])

    def exists(self, key: str) -> bool:
        """Whether the object exists (``HeadObject``)."""
        check_key(key)
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key, **self.owner)
        except Exception as exc:
            if error_code(exc) in MISSING_CODES:
                return False
            raise
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix), sorted.

        Listed in full before the first key is returned (``ListObjectsV2`` pages
        of 1,000), so the caller may write or delete while iterating.
        """
        check_prefix(prefix)
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **self.owner):
            keys.extend(str(obj["Key"]) for obj in page.get("Contents") or [])
        # S3 lists in UTF-8 byte order, which is code point order; sort anyway.
        keys.sort()
        return iter(keys)

    def delete(self, key: str) -> None:
        """Remove the object if present (deleting a missing key is no error in S3)."""
        check_key(key)
        self.s3.delete_object(Bucket=self.bucket, Key=key, **self.owner)

    def url(self, key: str) -> str:
        """``s3://BUCKET/KEY``."""
        return f"s3://{self.bucket}/{check_key(key)}"

    def close(self) -> None:
        """Nothing to release: the boto3 client is shared by the process."""


def owner_args(settings: AwsSettings, bucket: str | None = None) -> dict[str, str]:
    """``{"ExpectedBucketOwner": account}`` for a call to the stack's bucket (or to
    ``bucket``, when that is the stack's) with a configured owner; else ``{}``."""
    if settings.bucket_owner and (bucket is None or bucket == settings.bucket):
        return {"ExpectedBucketOwner": settings.bucket_owner}
    return {}


def _read_full(stream: _Prefixed, size: int) -> bytes:
    """``size`` bytes, fewer only at the end (S3 parts but the last are >= 5 MiB)."""
    chunks = []
    left = size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Prefixed(io.RawIOBase):
    """A readable stream of ``head`` (bytes already read) followed by the rest of ``tail``."""

    def __init__(self, head: bytes, tail: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._tail = tail

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            rest = bytes(self._head) + self._tail.read()
            self._head = memoryview(b"")
            return rest
        if self._head:
            out = bytes(self._head[:size])
            self._head = self._head[size:]
            if len(out) < size:
                out += self._tail.read(size - len(out))
            return out
        return self._tail.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
