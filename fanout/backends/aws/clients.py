"""boto3 clients for the AWS backend, built once per process.

Every client retries throttling and transient errors itself (botocore's
``standard`` retry mode, up to 10 attempts with jittered back-off), so the
backend code only ever sees errors that survived those retries.

Clients are cached per ``(process, service, settings)``: boto3 clients are
thread-safe and expensive to build, but must not cross a ``fork`` (their
connection pools would be shared by two processes), hence the pid in the key.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from botocore.config import Config

from fanout.backends.aws import AwsSettings

#: botocore retries throttling (``ThrottlingException``, ``SlowDown``, ...) and
#: transient errors (5xx, connection resets) itself, with back-off.
RETRIES: dict[str, Any] = {"mode": "standard", "max_attempts": 10}

#: Enough pooled connections for a worker's threads and s3transfer's.
MAX_POOL_CONNECTIONS = 50

_lock = threading.Lock()
_clients: dict[tuple[int, str, AwsSettings], Any] = {}


def client(service: str, settings: AwsSettings) -> Any:
    """The boto3 client of ``service`` ("sqs", "s3", "dynamodb") for ``settings``'
    region and endpoint, shared by the threads of this process."""
    key = (os.getpid(), service, settings)
    found = _clients.get(key)
    if found is not None:
        return found
    with _lock:
        found = _clients.get(key)
        if found is None:
            # A Session per client: boto3's default session is not thread-safe.
            session = boto3.session.Session()
            found = session.client(
                service,
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                config=Config(retries=RETRIES, max_pool_connections=MAX_POOL_CONNECTIONS),
            )
            _clients[key] = found
        return found


def clear_cache() -> None:
    """Forget every cached client (tests that change credentials or endpoints)."""
    with _lock:
        _clients.clear()


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``""`` for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    error = response.get("Error")
    if not isinstance(error, dict):
        return ""
    return str(error.get("Code", ""))
