"""What a process that forks children needs: children that die with their
parent, a child's resident memory, and an end for the processes a job started
(the local worker's supervisor and the scheduler's process, ``fanout.worker``
and ``fanout.schedules.fire``)."""

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


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid``, parents before their children (Linux
    ``/proc``; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = text[text.rindex(b")") + 2 :].split()
        if fields and fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that is still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
