"""Backends, opened by explicit name (no discovery by naming convention)."""

from __future__ import annotations

import os
from pathlib import Path

from fanout.backends.base import Backend

BACKENDS = ("local", "memory", "aws")


def default_home() -> Path:
    """``FANOUT_HOME``, or ``./.fanout``."""
    return Path(os.environ.get("FANOUT_HOME") or ".fanout")


def open_backend(name: str = "local", *, home: str | Path | None = None) -> Backend:
    """Open a backend by name: ``local`` (SQLite + a directory under ``home``),
    ``memory`` (everything in this process; for tests) or ``aws`` (SQS, S3,
    DynamoDB; ``home`` is not used)."""
    if name == "local":
        from fanout.backends.local import open_local

        return open_local(Path(home) if home is not None else default_home())
    if name == "memory":
        from fanout.backends.memory import open_memory

        return open_memory()
    if name == "aws":
        # Resources named by FANOUT_AWS_* / FANOUT_STAGE and the standard AWS
        # environment (region, endpoint, credentials); the CLI first puts the
        # names of the stage's stack there (fanout.backends.aws.stack).
        from fanout.backends.aws.backend import open_aws

        return open_aws()
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
