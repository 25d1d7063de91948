"""Fixtures of the backend contract suite: every test here runs against every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fanout.backends import open_backend
from fanout.backends.base import Backend

#: The backends the contract runs against (the AWS backend joins here later).
BACKEND_NAMES = ["memory", "local"]

#: Opens another backend on the same storage as the ``backend`` fixture's.
Opener = Callable[[], Backend]


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    name: str = request.param
    return name


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The backend's home directory (unused by backends that keep nothing on disk)."""
    return tmp_path / "home"


@pytest.fixture
def open_same(backend_name: str, home: Path) -> Iterator[Opener]:
    """A function that opens one more backend on the same storage (closed after the test).

    Only meaningful for backends whose state outlives the Backend object: a new
    memory backend would be empty, so tests that need shared state skip on it.
    """
    if backend_name == "memory":
        pytest.skip("the memory backend's state lives in one Backend object")
    opened: list[Backend] = []

    def opener() -> Backend:
        backend = open_backend(backend_name, home=home)
        opened.append(backend)
        return backend

    yield opener
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(backend_name: str, home: Path) -> Iterator[Backend]:
    """A freshly opened backend, closed after the test."""
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
