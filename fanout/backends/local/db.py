"""SQLite connections for the local backend: WAL mode, one writer at a time.

Several worker processes share one database file. WAL lets readers run beside
the single writer; ``BEGIN IMMEDIATE`` takes the write lock up front so a
read-then-write step never fails half way with SQLITE_BUSY; ``busy_timeout``
makes a writer wait for the lock instead of failing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: How long a writer waits for the lock before giving up (ms).
BUSY_TIMEOUT_MS = 60_000
#: WAL pages (4 KB) written before a commit checkpoints them into the database.
WAL_CHECKPOINT_PAGES = 10_000
#: The size (bytes) the WAL file is truncated to after a checkpoint.
WAL_SIZE_LIMIT = 64 * 1024 * 1024


class Database:
    """One SQLite connection per process (and thread), opened lazily.

    Opened after ``fork``: a connection must never cross a fork, so the
    connection is keyed by process id and thread.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._shared: sqlite3.Connection | None = None
        self._lock_path = self.path + ".lock"
        if self.path == ":memory:":
            # One connection shared by all threads of this process (the memory backend).
            self._shared = self._connect()
            self._lock = threading.RLock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (what the worker
        # model needs); only an OS crash can lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        if self.path != ":memory:":
            # A checkpoint runs inside the COMMIT that crosses the threshold, under
            # the write lock, with two fsyncs: at SQLite's default (1,000 pages) a
            # no-op chunk's two transactions paid for one every ~150 chunks, and
            # the other worker waited. Ten times fewer, each copying the hot pages
            # (the run's row, the state index) once instead of ten times: ~25%
            # more no-op chunks/s with 2 workers (tests/bench/bench_engine.py).
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._shared is not None:
            return self._shared
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            self._local.conn = self._connect()
            self._local.lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            self._local.pid = pid
        conn: sqlite3.Connection = self._local.conn
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding the write lock from its start."""
        if self._shared is not None:
            with self._lock:
                yield from self._tx(self._shared)
            return
        conn = self.conn
        # Writers queue on a kernel file lock before SQLite's own lock: the
        # kernel wakes the next writer the moment the lock is free, where
        # SQLite's busy handler would sleep 1-100 ms between retries (which
        # halved throughput with two worker processes).
        fd = self._local.lock_fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield from self._tx(conn)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def executescript(self, script: str) -> None:
        """Run DDL (idempotent ``CREATE ... IF NOT EXISTS``)."""
        self.conn.executescript(script)

    def close(self) -> None:
        conn = self._shared or getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        fd = getattr(self._local, "lock_fd", None)
        if fd is not None and getattr(self._local, "pid", None) == os.getpid():
            os.close(fd)
        self._local = threading.local()
