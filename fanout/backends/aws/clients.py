"""boto3 clients for the AWS backend, built once per process.

Every client retries throttling and transient errors itself (botocore's
``standard`` retry mode, up to 10 attempts with jittered back-off), so the
backend code only ever sees errors that survived those retries. A command a
person waits on at a prompt takes botocore's default of 3 (:func:`limit_attempts`):
10 attempts at an endpoint that refuses connections take ~45 s to say so.

Clients are cached per ``(process, service, settings, attempts)``: boto3 clients are
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
#: Attempts per call in a command a person waits on (botocore's own default).
INTERACTIVE_ATTEMPTS = 3
#: Attempts per call in the Lambda handler, whose invocation must answer
#: within its time: 10 attempts at an unreachable service took ~70 s a call.
#: A call that fails fails its record, which SQS delivers again.
LAMBDA_ATTEMPTS = 5
#: Seconds to open a connection. AWS endpoints answer in milliseconds; botocore's
#: 60 s default, times 10 attempts, would leave a worker (or a Lambda in a VPC
#: with no route to the service) hanging 10 minutes on an endpoint it cannot reach.
CONNECT_TIMEOUT = 5.0

#: Enough pooled connections for a worker's threads and s3transfer's.
MAX_POOL_CONNECTIONS = 50

_lock = threading.Lock()
_clients: dict[tuple[int, str, AwsSettings, int], Any] = {}
_sessions: dict[int, Any] = {}  # one per process (by pid), like the clients
_attempts = RETRIES["max_attempts"]


def limit_attempts(attempts: int) -> None:
    """Give this process's clients built from now on ``attempts`` per call
    (:data:`INTERACTIVE_ATTEMPTS` for a CLI command a person waits on,
    :data:`LAMBDA_ATTEMPTS` in the Lambda handler)."""
    global _attempts
    _attempts = attempts


def client(service: str, settings: AwsSettings) -> Any:
    """The boto3 client of ``service`` ("sqs", "s3", "dynamodb") for ``settings``'
    region and endpoint, shared by the threads of this process."""
    key = (os.getpid(), service, settings, _attempts)
    found = _clients.get(key)
    if found is not None:
        return found
    with _lock:
        found = _clients.get(key)
        if found is None:
            # One Session for all of this process's clients: each new Session
            # loads botocore's endpoint and retry data again, which cost a cold
            # Lambda ~100 ms per client (tests/bench/bench_coldstart.py). A Session
            # is not thread-safe, but it is only used here, under the lock.
            session = _sessions.get(key[0])
            if session is None:
                session = _sessions[key[0]] = boto3.session.Session()
            found = session.client(
                service,
                region_name=settings.region,
                endpoint_url=settings.endpoint_url,
                config=Config(
                    retries={**RETRIES, "max_attempts": _attempts},
                    connect_timeout=CONNECT_TIMEOUT,
                    max_pool_connections=MAX_POOL_CONNECTIONS,
                ),
            )
            _clients[key] = found
        return found


def _reset_after_fork() -> None:
    # A fork taken while another thread held the lock would leave the child a
    # lock nobody releases; the child builds its own clients anyway (pid keys).
    global _lock
    _lock = threading.Lock()
    _clients.clear()
    _sessions.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def clear_cache() -> None:
    """Forget every cached client and session (tests that change credentials or
    endpoints: a session keeps the credentials it resolved first)."""
    with _lock:
        _clients.clear()
        _sessions.clear()


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``""`` for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    error = response.get("Error")
    if not isinstance(error, dict):
        return ""
    return str(error.get("Code", ""))
