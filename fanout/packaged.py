"""On Lambda, a job ref resolves only inside the deployed package.

A run's job ref comes from the ledger, and a schedule's from its EventBridge
input: whoever can write either would otherwise name any importable module or
any ``.py`` file on the function's disk, and run it. So on Lambda (the
runtime sets ``LAMBDA_TASK_ROOT``, where ``fanout deploy``'s zip is unpacked)
a ref must name a job the deploy shipped under ``jobs/``:

- a path (``jobs/x.py``, or absolute as ``coordinator.submit`` stores it):
  resolved, symbolic links followed, it must lie under ``<root>/jobs/``;
- a module (``jobs.x`` or ``jobs.x:attr``): its file, looked up under
  ``<root>`` without importing anything, must lie under ``<root>/jobs/``.

Anything else raises :class:`JobOutsidePackage`, a permanent error: the task is
dead-lettered at once, with the reason in its failure and in the log. Off
Lambda (no ``LAMBDA_TASK_ROOT``) every ref is allowed, as on a developer's
machine.

The check runs before the job is loaded; it does not change how
:func:`fanout.jobs.load_job` imports it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fanout.errors import PermanentError
from fanout.jobs import is_path_ref

log = logging.getLogger("fanout.jobs")

#: The directory of the deployed package that holds the jobs (see fanout.deploy).
JOBS_DIR = "jobs"


class JobOutsidePackage(PermanentError):
    """A job ref that does not resolve inside the deployed package (Lambda)."""


def package_root() -> Path | None:
    """Where the deployed package is, on Lambda; None elsewhere."""
    root = os.environ.get("LAMBDA_TASK_ROOT", "").strip()
    return Path(root) if root else None


def job_refusal(ref: str, root: Path | None = None) -> str | None:
    """Why ``ref`` must not be loaded from the package at ``root`` (default: the
    Lambda package, :func:`package_root`); None if it may, or off Lambda."""
    root = root if root is not None else package_root()
    if root is None:
        return None
    jobs = (root / JOBS_DIR).resolve()
    target = ref if ref.endswith(".py") else ref.partition(":")[0]
    if is_path_ref(target):
        path = Path(target)
        found = (path if path.is_absolute() else root / path).resolve()
        if found.suffix != ".py" or not found.is_relative_to(jobs):
            return f"job {ref!r} is not a file under the deployed {JOBS_DIR}/"
        return None
    parts = target.split(".")
    if parts[0] != JOBS_DIR or not all(p.isidentifier() for p in parts):
        return f"job module {target!r} is not in the deployed {JOBS_DIR} package"
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and candidate.resolve().is_relative_to(jobs):
            return None
    return f"job module {target!r} is not in the deployed {JOBS_DIR} package"


def check_packaged(ref: str) -> None:
    """:class:`JobOutsidePackage` (logged) if ``ref`` may not run here; see the module."""
    refused = job_refusal(ref)
    if refused:
        log.error("refusing to load a job: %s", refused)
        raise JobOutsidePackage(f"{refused} (on Lambda only deployed jobs run)")
