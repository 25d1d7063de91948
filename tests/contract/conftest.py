"""Fixtures of the backend contract suites: every test in this directory runs
once per backend, through the ``backend`` fixture.

What each backend run covers:

- ``memory`` (``fanout.backends.memory``): the local backend's SQLite queue and
  ledger classes on one in-process ``:memory:`` database (a single connection,
  no WAL file, no second process) and a dict as the store. Its queue and ledger
  are the same code as ``local``'s, so what this run adds is the dict store and
  that code on one shared connection. Its state cannot be reopened or shared,
  so the tests that need ``open_same`` or ``reopen`` skip on it.
- ``local`` (``fanout.backends.local``): the same SQLite classes on a WAL
  database file, opened anew by other backends and processes (``open_same``,
  ``reopen``, the concurrency tests), and the directory store.
- ``aws`` (``fanout.backends.aws``): SQS, S3 and DynamoDB under moto in this
  process. moto's state lives in this process: a forked child gets a copy, not
  a connection, so the tests that share a backend with child processes skip
  on it.

A test that checks one backend's own behaviour (its resources, its limits)
belongs beside that backend's other tests, not here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fanout.backends import open_backend
from fanout.backends.base import Backend
from support.helpers import fake_aws

#: The backends the contract runs against (see above).
BACKEND_NAMES = ["memory", "local", "aws"]

#: Opens another backend on the same storage as the ``backend`` fixture's.
Opener = Callable[[], Backend]

#: The schedule store on AWS creates EventBridge schedules with this role.
SCHEDULE_ROLE = "arn:aws:iam::123456789012:role/fanout-scheduler"


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    name: str = request.param
    return name


@pytest.fixture
def moto_stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake credentials (never a user's real ones) and the stack's queue, bucket
    and table under moto, for the ``aws`` backend."""
    from moto import mock_aws

    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.clients import clear_cache
    from fanout.backends.aws.resources import create_resources

    fake_aws(monkeypatch, FANOUT_STAGE="contract", FANOUT_AWS_SCHEDULE_ROLE=SCHEDULE_ROLE)
    clear_cache()
    with mock_aws():
        create_resources(AwsSettings.from_env())
        yield
    clear_cache()


def _storage(backend_name: str, request: pytest.FixtureRequest) -> None:
    """Make the storage ``backend_name`` opens exist for the test's duration."""
    if backend_name == "aws":
        request.getfixturevalue("moto_stack")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The backend's home directory (unused by backends that keep nothing on disk)."""
    return tmp_path / "home"


@pytest.fixture
def open_same(backend_name: str, home: Path, request: pytest.FixtureRequest) -> Iterator[Opener]:
    """A function that opens one more backend on the same storage (closed after the test).

    Only meaningful for backends whose state outlives the Backend object: a new
    memory backend would be empty, so tests that need shared state skip on it.
    """
    if backend_name == "memory":
        pytest.skip("the memory backend's state lives in one Backend object")
    _storage(backend_name, request)
    opened: list[Backend] = []

    def opener() -> Backend:
        backend = open_backend(backend_name, home=home)
        opened.append(backend)
        return backend

    yield opener
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(backend_name: str, home: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A freshly opened backend, closed after the test."""
    _storage(backend_name, request)
    opened = open_backend(backend_name, home=home)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def reopen(backend: Backend, open_same: Opener) -> Callable[[], Backend]:
    """Close ``backend`` and open it again on the same storage (skipped on memory)."""

    def reopen_() -> Backend:
        # Close first, so nothing held only by the open backend can be what the
        # new one sees. Closing twice (again at teardown) must be harmless.
        backend.close()
        return open_same()

    return reopen_
