"""What a process that forks children needs: children that die with their
parent, and a child's resident memory (the local worker's supervisor and the
scheduler's process, ``fanout.worker`` and ``fanout.schedules.fire``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024) if hasattr(os, "sysconf") else 0.0


def resident_mb(pid: int) -> int | None:
    """A process's resident memory in MB (Linux ``/proc``), or None if unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(int(f.read().split()[1]) * _PAGE_MB)
    except (OSError, IndexError, ValueError):
        return None


def die_with_parent() -> None:
    """Linux: die with the supervisor (``kill -9`` of the supervisor must not
    leave children working unsupervised)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
