"""Shared fixtures: backends and fast leases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fanout.backends import open_backend
from fanout.backends.base import Backend


def pytest_configure(config: pytest.Config) -> None:
    """moto, where installed, gets the patches that make it fast enough for the
    AWS tests (same behaviour; see ``support.motopatch``)."""
    try:
        from support.motopatch import patch_moto
    except ImportError:  # pragma: no cover - moto is a dev extra
        return
    patch_moto()


@pytest.fixture
def mem() -> Iterator[Backend]:
    """An in-process memory backend."""
    backend = open_backend("memory")
    yield backend
    backend.close()


@pytest.fixture
def fast_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases that outlive the hard timeout by 50 ms, not 5 s, so takeovers are quick."""
    monkeypatch.setattr("fanout.phases.LEASE_GRACE", 0.05)  # what an Ask's lease uses
    monkeypatch.setattr("fanout.runner.LEASE_GRACE", 0.05)  # its re-export


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def ledger(home: Path) -> Iterator[Backend]:
    """The local backend of ``home``, opened in the test process to watch the ledger."""
    backend = open_backend("local", home=home)
    yield backend
    backend.close()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """The AWS backend on moto in this process (stage ``test``), with a cold
    Lambda container: ``fanout.aws_lambda`` builds its runner anew."""
    from moto import mock_aws

    import fanout.aws_lambda as lambda_mod
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.clients import clear_cache
    from fanout.backends.aws.resources import create_resources
    from support.helpers import fake_aws

    fake_aws(monkeypatch, FANOUT_STAGE="test")
    monkeypatch.setattr(lambda_mod, "_warm", None)
    clear_cache()
    with mock_aws():
        create_resources(AwsSettings.from_env())
        backend = open_backend("aws")
        yield backend
        backend.close()
    clear_cache()
