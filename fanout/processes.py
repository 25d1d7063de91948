"""What a process that forks children needs: children that die with their
parent, a child's resident memory, and an end for the processes a job started
(the local worker's supervisor and the scheduler's process, ``fanout.worker``
and ``fanout.schedules.fire``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time

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


def become_subreaper(on: bool = True) -> bool:
    """Linux: have the orphans of this process's descendants become its children
    (not init's), so that what a worker child's chunk started is still found
    after that child dies on its own (:func:`orphans`). False where it cannot."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.prctl(36, int(on), 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _children(zombies: bool = False) -> dict[int, list[int]]:
    """Every live process's children, or with ``zombies`` every process's that
    has exited and not been reaped (Linux ``/proc``; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
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
        if fields and (fields[0] == b"Z") == zombies and fields[0] != b"X":
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def _below(children: dict[int, list[int]], roots: list[int]) -> list[int]:
    found: list[int] = []
    todo = list(roots)
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid``, parents before their children (Linux
    ``/proc``; elsewhere none are found)."""
    return _below(_children(), [pid])


def orphans(keep: set[int]) -> list[int]:
    """The children of this process (a subreaper: :func:`become_subreaper`) that
    are not in ``keep`` (its own worker processes), with their descendants,
    parents first: what chunks of dead worker children left running."""
    children = _children()
    adopted = [pid for pid in children.get(os.getpid(), []) if pid not in keep]
    return adopted + _below(children, adopted)


def exited_orphans(keep: set[int]) -> list[int]:
    """The children of this process (a subreaper) not in ``keep`` that have
    exited: orphans it adopted, to :func:`reap` (an orphan it adopted outside a
    worker's death, from a chunk that detached a process, ends so)."""
    return [pid for pid in _children(zombies=True).get(os.getpid(), []) if pid not in keep]


def reap(pids: list[int], within: float = 1.0) -> None:
    """Collect the exit of those of ``pids`` that are this process's children
    (killed orphans it adopted), so none stays a zombie; waits ``within``
    seconds at most in all (one that could not be killed is left)."""
    deadline = time.monotonic() + within
    for pid in pids:
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                    break
            except OSError:  # not our child (a descendant of one), or gone
                break
            time.sleep(0.005)


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` that is still there."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
