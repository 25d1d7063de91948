"""Compressing an Avro file's blocks in a thread while the chunk encodes the next.

fastavro encodes a chunk's records and, each time a block fills, compresses it,
all in the chunk's thread. With the deflate codec the compression is about a
fifth of what writing the meter-readings output costs (``tests/bench/bench_etl.py``).
zlib (like bz2 and lzma) lets go of the GIL while it compresses, so a second
thread can compress block *n* while the chunk's thread encodes block *n + 1*.
Where the machine has a core to spare (one worker on a laptop, a Lambda
function of 1,769 MB and more), writing took 7-20% less wall time on
2026-12-07 (README, "Blocks deflated in a thread"), for 2-15% more CPU; with
no core spare it took more of both, so a worker pool's children that take
every core compress inline (:func:`share_cores_with`).

The file is byte for byte what fastavro alone writes: the blocks are compressed
by fastavro's own block writer, into memory, and written in order. At most
:data:`AHEAD` blocks are in flight, so the memory it takes is a few blocks.
"""

from __future__ import annotations

import io
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from fastavro.write import Writer

#: Blocks handed to the thread and not yet written, at most.
AHEAD = 2

#: fastavro's block writer: (file, block bytes, compression level); it writes the
#: compressed block's length and bytes to the file.
BlockWriter = Callable[[Any, bytes, Any], None]

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _executor() -> ThreadPoolExecutor:
    """This process's compression thread (one: blocks are written in order, and
    a chunk's thread encodes while it works). Made again in a forked child,
    where the parent's thread does not exist."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fanout-avro-blocks")
        _pool_pid = os.getpid()
    return _pool


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: The busy processes this one shares the machine's cores with, itself included
#: (a worker pool's children): see :func:`share_cores_with`.
_sharing = 1


def share_cores_with(processes: int) -> None:
    """Say this process is one of ``processes`` that keep a core busy each (a
    worker pool's children). Where they take every core, a compression thread
    gains nothing and its hand-offs cost CPU, so blocks are compressed inline."""
    global _sharing
    _sharing = max(1, processes)


#: At or above this share of the last 10 s in which some task waited for a CPU
#: (the kernel's pressure stall figure), blocks are compressed inline. A run
#: with its own thread, alone on 2 cores, makes 3-10% itself. Measured on
#: 2026-12-07, a 1-worker run on 2 cores beside busy processes: beside one
#: (5%), the thread took 6% off the run; beside two (50%), it added 2%.
STALL_LIMIT = 0.4


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:  # not Linux, or a kernel built without it
        return None


def _stall() -> float | None:
    """The share of the last 10 s in which some task waited for a CPU (Linux's
    pressure stall information, /proc/pressure/cpu); None where unknown."""
    text = _read("/proc/pressure/cpu")
    if not text:
        return None
    for word in text.split():
        if word.startswith("avg10="):
            try:
                return float(word[6:]) / 100
            except ValueError:
                return None
    return None


#: Seconds a reading of the pressure figure is used for: the kernel updates it
#: every 2 s, and reading it costs some 40 us, which a quick chunk would feel.
STALL_EVERY = 1.0

_stall_read: tuple[float, float | None] = (-STALL_EVERY, None)
_clock = time.monotonic


def _recent_stall() -> float | None:
    """:func:`_stall`, read at most once every :data:`STALL_EVERY` seconds."""
    global _stall_read
    now = _clock()
    at, stall = _stall_read
    if now - at >= STALL_EVERY:
        stall = _stall()
        _stall_read = (now, stall)
    return stall


def _load() -> float:
    """The machine's load average over the last minute (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _spare_core() -> bool:
    """Whether a core is free for the compression thread: more cores than this
    process's pool takes (:func:`share_cores_with`), on a machine whose tasks
    were not kept waiting for a CPU lately.

    The last is read from the kernel's pressure stall figure where it has one:
    it reacts within seconds, and it hardly counts this process's own work, as
    the load average does (a minute late, so one run right after another found
    the machine "busy" with itself and compressed inline). A count of the
    tasks running at the instant was tried and dropped: it caught the worker's
    own supervisor awake for half the chunks. Where the kernel has no pressure
    figure, the load average stands in."""
    if _cores() <= _sharing:
        return False
    stall = _recent_stall()
    if stall is not None:
        return stall < STALL_LIMIT
    return _load() < _cores()


#: Whether fastavro's ``Writer`` is its compiled one, whose block writers take
#: the file itself (the pure-Python ones take an encoder).
_COMPILED = Writer.__module__ == "fastavro._write"


def worth_it(codec: str) -> bool:
    """Whether compressing in a thread can gain anything: a codec that
    compresses, fastavro's compiled ``Writer``, and a core to spare
    (:func:`_spare_core`; beside a busy test suite the thread lost 17% of
    wall time). Asked for each file, so a machine that turns busy is seen
    at the next chunk."""
    return _COMPILED and codec != "null" and _spare_core()


def _compress(block_writer: BlockWriter, block: bytes, level: Any) -> bytes:
    out = io.BytesIO()
    block_writer(out, block, level)
    return out.getvalue()


class BlockPipeline:
    """The file fastavro writes to, and the block writer it calls: headers,
    block counts and sync markers pass straight to ``out`` unless a block
    before them is still being compressed, then they wait their turn.

    Args:
        out: where the Avro file is written.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._block_writer: BlockWriter | None = None
        #: What waits to be written, in order: bytes, or a block being compressed.
        self._pending: deque[bytes | Future[bytes]] = deque()
        self._in_flight = 0

    # -- the file fastavro writes to ----------------------------------------------

    def write(self, data: bytes) -> int:
        """Write ``data`` after everything handed over before it."""
        if self._pending:
            self._pending.append(bytes(data))
        else:
            self._out.write(data)
        return len(data)

    def seekable(self) -> bool:
        """False: fastavro asks, to know it is not appending to a file."""
        return False

    def flush(self) -> None:
        """Nothing: :meth:`drain` writes what is pending (fastavro's ``flush``
        calls this after handing over its last block)."""

    # -- the block writer -----------------------------------------------------------

    def take_blocks_of(self, writer: Any) -> None:
        """Compress the blocks of fastavro's ``writer`` (made on this pipeline)
        in the thread, with the block writer it chose for its codec."""
        self._block_writer = writer.block_writer
        writer.block_writer = self.compress

    def compress(self, fo: Any, block: bytes, level: Any) -> None:
        """Hand ``block`` to the thread, to be written when compressed; wait
        for the oldest block first if :data:`AHEAD` are in flight."""
        assert self._block_writer is not None, "take_blocks_of() first"
        try:
            future = _executor().submit(_compress, self._block_writer, block, level)
        except RuntimeError:
            # The interpreter is shutting down (a record written from a thread
            # the main thread left behind): no new futures, so compress inline.
            self.write(_compress(self._block_writer, block, level))
            return
        self._pending.append(future)
        self._in_flight += 1
        self._write_ready(AHEAD)

    def drain(self) -> None:
        """Wait for every block and write everything, in order. Raises what the
        compression raised, if it did."""
        self._write_ready(0)

    def _write_ready(self, ahead: int) -> None:
        """Write what is ready from the front, and wait for blocks until at
        most ``ahead`` are in flight."""
        pending, out = self._pending, self._out
        while pending:
            head = pending[0]
            if isinstance(head, Future):
                if self._in_flight <= ahead and not head.done():
                    return
                out.write(head.result())
                self._in_flight -= 1
            else:
                out.write(head)
            pending.popleft()
