"""Runs do not share job modules: each load of a job file imports it and the
modules beside it (its *own* modules) afresh, and a chunk runs with its own job's
modules in ``sys.modules`` and its directory first on ``sys.path``.

A long-lived worker runs chunks of many runs in one process. Without this, run
B's ``import helper`` would get run A's ``helper.py`` from another directory
(Python caches modules by name), and a replay after fixing ``helper.py`` would
still run the old one. What is isolated: modules whose file lies under the job
file's directory (and the job file itself). What is shared: everything else
(installed packages, the standard library, fanout), imported once per process.

Nor do chunks share a working directory or umask: :class:`ProcessState` puts
back, after each chunk (``Runner.work``), those its runner started with. Nor
environment variables: it undoes the changes of a chunk's job code, measured
from just before that code runs, after the job is loaded (so what a job module
sets at import, ``load_dotenv()``, stays for its later chunks, and on a warm
Lambda the runtime's per-invocation ``_X_AMZN_TRACE_ID`` is the one kept).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(eq=False)
class JobModules:
    """A job file's directory and the modules one load of it imported from there."""

    home: str
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def files(self) -> list[str]:
        """The source files of these modules (whose edits make a reload)."""
        return [f for m in self.modules.values() if (f := _file(m)) is not None]


#: The modules in ``sys.modules`` now (None: no job's own modules are).
_active: JobModules | None = None
#: Job directories this module put on ``sys.path`` (others are left alone).
_added_paths: set[str] = set()


def _file(module: ModuleType) -> str | None:
    f = getattr(module, "__file__", None)
    return str(f) if isinstance(f, str) else None


def _owned_by(module: ModuleType, name: str, home: str) -> bool:
    """Whether ``module`` is one of the job's own: a file under its directory that
    is neither fanout nor an installed package (a job may sit at a project root
    that also holds them)."""
    if name == "fanout" or name.startswith("fanout."):
        return False
    f = _file(module)
    if f is None or not f.startswith(home + os.sep):
        return False
    return "site-packages" not in f and "dist-packages" not in f


def _take_out(home: str) -> dict[str, ModuleType]:
    """Remove the modules under ``home`` from ``sys.modules``; return them."""
    taken = {}
    for name, module in list(sys.modules.items()):
        if module is not None and _owned_by(module, name, home):
            taken[name] = module
            del sys.modules[name]
    return taken


def _path_first(home: str) -> None:
    """``home`` first on ``sys.path``; other job directories fanout added, off it."""
    for other in _added_paths - {home}:
        while other in sys.path:
            sys.path.remove(other)
    if not sys.path or sys.path[0] != home:
        if home not in sys.path:
            _added_paths.add(home)
        else:
            sys.path.remove(home)
        sys.path.insert(0, home)


def activate(modules: JobModules | None) -> None:
    """Make ``modules`` the ones imports see: cheap when they already are."""
    global _active
    if modules is _active or modules is None:
        return
    if _active is not None:
        # Keep what the outgoing job imported since its load (inside a function).
        _active.modules.update(_take_out(_active.home))
    _take_out(modules.home)  # a stale copy left by an earlier load
    sys.modules.update(modules.modules)
    _path_first(modules.home)
    _active = modules


def import_fresh(home: Path, load: Callable[[], _T]) -> tuple[_T, JobModules]:
    """Run ``load`` (which imports a job file in ``home``) with none of ``home``'s
    modules cached, and collect the modules it imported from there."""
    global _active
    if _active is not None:
        _active.modules.update(_take_out(_active.home))
        _active = None
    where = str(home)
    _take_out(where)
    _path_first(where)
    result = load()
    modules = JobModules(where)
    modules.modules = {
        name: module
        for name, module in list(sys.modules.items())
        if module is not None and _owned_by(module, name, where)
    }
    _active = modules
    return result, modules


class ProcessState:
    """The working directory and umask a process runs its chunks with, and the
    environment each chunk's job code starts with. A chunk that changes them
    (``os.chdir``, ``os.umask``, ``os.environ[...] = ...``) would change them for
    every later chunk in the process, of its run or another's: :meth:`restore`
    after each chunk.

    The environment is noted per chunk (:meth:`job_code_starts`), not once per
    process: a job module imported meanwhile (once per run and process, then
    cached) may set variables its later chunks rely on, and the Lambda runtime
    sets a new ``_X_AMZN_TRACE_ID`` before each invocation. Only what goes
    through ``os.environ`` is seen (not a bare ``os.putenv`` or C code's
    ``setenv``), and what changed during the chunk is undone whichever thread
    changed it (a thread a job leaves running should not keep state there).

    Timers and signal handlers too: an ``alarm()`` a chunk left set went off
    in a later chunk, and its SIGALRM killed the worker there, that chunk
    blamed (and retried) for it. And stdout and stderr, if a chunk closed
    them: every later chunk's logs went nowhere."""

    def __init__(self) -> None:
        self.cwd = os.getcwd()
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        #: The handlers the process runs chunks with (those Python set: others
        #: read as None and cannot be put back from Python).
        self.handlers = {
            sig: handler for sig in _SIGNALS if (handler := _getsignal(sig)) is not None
        }
        #: The environment the chunk in hand started its job code with (encoded).
        self._environ: dict[Any, Any] | None = None
        self._std = _std_kept()
        #: What fds 1 and 2 were when the chunk in hand started its job code.
        self._std_at_start: dict[int, tuple[int, int] | None] = {}

    def job_code_starts(self) -> None:
        """Note the environment as it is now, just before the chunk's job code
        runs (its job loaded): :meth:`restore` puts it back."""
        # A shallow copy of the encoded mapping: 0.1 us, where dict(os.environ)
        # decodes every entry (17 us, a fifth of a no-op chunk).
        self._environ = _raw_environ().copy()
        self._std_at_start = {fd: _identity(fd) for fd in self._std}

    def restore(self) -> None:
        """Put the working directory, the umask, the environment, the timer,
        signal handlers, stdout and stderr back (some 5 us of syscalls and
        compares, when the chunk changed nothing)."""
        os.umask(self.umask)
        self._signals_back()
        self._std_back()
        environ, self._environ = self._environ, None
        # One C-level compare of the encoded mappings (0.2 us); only a chunk that
        # changed something pays for the walk, and only its keys are set again.
        if environ is not None and _raw_environ() != environ:
            _put_back(environ)
        try:
            if os.getcwd() == self.cwd:
                return
        except OSError:  # the chunk removed the directory it moved to
            pass
        # (If the start directory is gone itself, there is nothing to go back to.)
        with contextlib.suppress(OSError):
            os.chdir(self.cwd)

    def _std_back(self) -> None:
        """Put fds 1 and 2 back if the chunk closed them (a file opened after
        the close takes the fd, and logs would be written into it) or pointed
        them elsewhere; only if they were the process's own at the chunk's
        start (a test runner may have put its capture there, not ours to undo)."""
        at_start, self._std_at_start = self._std_at_start, {}
        for fd, (copy, identity) in self._std.items():
            start = at_start.get(fd)
            if start == identity and _identity(fd) != start:
                with contextlib.suppress(OSError):
                    os.dup2(copy, fd)
        sys.stdout = _stream_back(sys.stdout, 1)
        sys.stderr = _stream_back(sys.stderr, 2)

    def _signals_back(self) -> None:
        """Stop the wall-clock timer a chunk left running (a syscall) and put
        back the handlers it changed (a lookup each)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals are the main thread's to handle (an embedding's own thread)
        for timer in _TIMERS:
            signal.setitimer(timer, 0)
        for sig, handler in self.handlers.items():
            if _getsignal(sig) != handler:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    signal.signal(sig, handler)


#: Signals whose handling a job may change in its chunk and leave so, to the
#: cost of later chunks: SIGINT and SIGTERM (a worker leaves them to its
#: supervisor) and SIGPIPE (Python ignores it: a write to a closed socket
#: raises, not kills). Half a microsecond each to look at, per chunk.
_SIGNALS = tuple(int(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE))
#: ``signal.getsignal`` without its conversion of 0 and 1 to an enum, which is
#: most of its 0.5 us (SIG_DFL and SIG_IGN come back as those ints).
_getsignal: Any = importlib.import_module("_signal").getsignal
#: The wall-clock timer (``alarm``, ``setitimer(ITIMER_REAL)``), whose SIGALRM
#: ends a process by default. (The CPU-time timers, a profiler's, are left.)
_TIMERS = (signal.ITIMER_REAL,)


#: This process's copies of stdout and stderr: its pid, then fd -> (copy,
#: what the fd was when copied).
_STD_KEPT: tuple[int, dict[int, tuple[int, tuple[int, int]]]] = (0, {})


def _stream_back(now: Any, fd: int) -> Any:
    """``sys.stdout`` (or ``stderr``), opened again on its fd if a chunk closed
    it (``sys.stdout.close()``, which leaves fd 1 open): every later print in
    the process, and fanout's own log lines, raised "I/O operation on closed
    file", failing innocent chunks. One that is open is left as it is, even
    replaced: another thread may have put its own there (a test runner's
    capture, ``contextlib.redirect_stdout``), not ours to undo."""
    if not _closed(now):
        return now
    try:
        fresh = open(  # noqa: SIM115  # (it is the process's stream from now on)
            fd,
            "w",
            encoding=getattr(now, "encoding", None),
            errors=getattr(now, "errors", None),
            closefd=False,
        )
    except (OSError, ValueError, TypeError, LookupError):
        return now  # nothing better to offer
    fresh.reconfigure(line_buffering=True, write_through=False)  # as logs.whole_lines
    return fresh


def _closed(stream: Any) -> bool:
    try:
        return bool(stream.closed)
    except Exception:  # not a file at all: a job's odd replacement
        return False


def _identity(fd: int) -> tuple[int, int] | None:
    """The file ``fd`` is (device, inode), or None if it is closed (a syscall)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _std_kept() -> dict[int, tuple[int, tuple[int, int]]]:
    """Copies of fds 1 and 2 as they are now, made once per process, to put
    back one a chunk closed (see :meth:`ProcessState.restore`)."""
    global _STD_KEPT
    pid, kept = _STD_KEPT
    if pid != os.getpid():
        for copy, _ in kept.values():  # a forked child's inherited copies
            with contextlib.suppress(OSError):
                os.close(copy)
        kept = {}
        for fd in (1, 2):
            identity = _identity(fd)
            if identity is not None:  # (not open: nothing to keep)
                kept[fd] = (os.dup(fd), identity)
        _STD_KEPT = (os.getpid(), kept)
    return kept


def _raw_environ() -> dict[Any, Any]:
    """The encoded mapping behind ``os.environ`` (bytes on POSIX: what ``putenv``
    was given), which it keeps in step with every set and delete."""
    data: dict[Any, Any] = os.environ._data  # type: ignore[attr-defined]
    return data


def _put_back(before: dict[Any, Any]) -> None:
    """Undo, key by key, what changed in ``os.environ`` since ``before`` (its
    encoded copy): not clear() and update(), which would unset and set every
    variable again, and briefly leave the process with an empty environment."""
    # A copy (one C-level step): a thread of the job's may set a variable
    # meanwhile, and iterating the live mapping would then raise.
    env, now = os.environ, _raw_environ().copy()
    for key in [k for k in now if k not in before]:  # added
        env.pop(env.decodekey(key), None)  # (None: a thread deleted it meanwhile)
    for key, value in before.items():  # removed or changed
        if now.get(key) != value:
            env[env.decodekey(key)] = env.decodevalue(value)
