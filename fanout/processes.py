"""What a process that forks children needs: children that die with their
parent, a child's resident memory, and an end for the processes a job started
(the local worker's supervisor and the scheduler's process, ``fanout.worker``
and ``fanout.schedules.fire``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import time
from multiprocessing.sharedctypes import RawValue

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


#: Set in each worker process's environment (``<supervisor pid>.<worker pid>``)
#: and so inherited by what its chunks start: which worker an orphan the
#: supervisor adopted came from (:func:`orphans`).
WORKER_MARK = "FANOUT_WORKER_PROCESS"


def subreaper(on: bool) -> bool | None:
    """Linux: have (or stop having) the orphans of this process's descendants
    become its children, not init's, so that what a worker process's chunk
    started is still found after that worker dies on its own. Returns what it
    was before, to put back; None where it cannot."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        was = ctypes.c_int(0)
        if libc.prctl(37, ctypes.byref(was), 0, 0, 0) != 0:  # PR_GET_CHILD_SUBREAPER
            return None
        if libc.prctl(36, int(on), 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            return None
        return bool(was.value)
    except (OSError, AttributeError):
        return None


def mark_worker(supervisor: int) -> None:
    """Mark this worker process (and what its chunks start) as the supervisor's."""
    os.environ[WORKER_MARK] = f"{supervisor}.{os.getpid()}"


def _mark_of(pid: int) -> str | None:
    """The :data:`WORKER_MARK` in a process's environment (as it started), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = WORKER_MARK.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


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


def orphans(keep: set[int], worker: int | None = None) -> list[int]:
    """The children of this process (a :func:`subreaper`) that are not in
    ``keep`` (its multiprocessing children) and carry its :data:`WORKER_MARK`,
    of ``worker`` only if given, with their descendants, parents first: what
    chunks of worker processes that died left running. Nothing unmarked (a
    process of the program running the pool) is named."""
    children = _children()
    me = os.getpid()
    wanted = f"{me}." if worker is None else f"{me}.{worker}"
    adopted = []
    for pid in children.get(me, []):
        mark = None if pid in keep else _mark_of(pid)
        if mark is not None and (mark == wanted or (worker is None and mark.startswith(wanted))):
            adopted.append(pid)
    return adopted + _below(children, adopted)


def exited_children(keep: set[int]) -> list[int]:
    """The children of this process not in ``keep`` that have exited and wait
    to be reaped (:func:`reap`). For a process whose only other children are
    orphans it adopted: an exited process's environment cannot be read."""
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


class SharedFlag:
    """A stop or wake-up flag that a signal handler may set and that forked
    children share, which no process can wedge by dying.

    ``multiprocessing.Event.set()`` waits for every process asleep in its
    ``wait()`` to wake: one SIGKILLed there never does, so ``set()`` hung for
    ever (the worker pool's shutdown, after an idle child was killed). And
    ``threading.Event.set()`` takes the event's lock, so a signal handler
    calling it deadlocks if the signal came while the main thread held that
    lock. Here nothing waits on anyone: the flag is a byte of shared memory
    without a lock, and :meth:`wait` sleeps in ``select()`` on a pipe that
    :meth:`set` writes a byte to, which wakes every waiter (a waiter never
    reads it; :meth:`take`, for a flag with one waiter, empties it).
    Made before the children are forked: they inherit both.
    """

    def __init__(self) -> None:
        self._flag = RawValue(ctypes.c_bool, False)
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        """Raise the flag and wake every waiter (safe in a signal handler)."""
        self._flag.value = True
        if self._write >= 0:  # (not closed: its number may be another file's now)
            with contextlib.suppress(OSError):  # the pipe is full: a wake-up is there already
                os.write(self._write, b"x")

    def is_set(self) -> bool:
        """Whether the flag is up."""
        return bool(self._flag.value)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, or until :meth:`set`; return :meth:`is_set`."""
        if not self._flag.value and self._read >= 0:
            with contextlib.suppress(InterruptedError):
                select.select([self._read], [], [], timeout)
        return bool(self._flag.value)

    def take(self, timeout: float) -> bool:
        """:meth:`wait`, and lower the flag if it was up, for a flag one process
        waits on (a child's "look now"); returns whether it was. A set() just
        after is seen by what the waiter does next anyway."""
        was = self.wait(timeout)
        if was:
            self._flag.value = False
        # Emptied whatever the flag says: a byte a set() wrote after the last
        # take() emptied the pipe would make every wait() return at once.
        with contextlib.suppress(OSError):  # (empty: BlockingIOError; closed: EBADF)
            while self._read >= 0 and os.read(self._read, 4096):
                pass
        return was

    def close(self) -> None:
        """Close the pipe; the flag still answers :meth:`is_set`, and
        :meth:`set` and :meth:`wait` no longer touch a file."""
        read, write, self._read, self._write = self._read, self._write, -1, -1
        for fd in (read, write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
