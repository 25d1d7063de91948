"""Avro schemas and output files.

A job names one Avro schema (an ``.avsc`` file, or an inline dict); every record a
chunk emits goes through a :class:`RecordWriter`, which produces one Avro object
container file per chunk. :func:`read_records` and :func:`to_json_safe` serve
``fanout cat``, which prints an output file as JSON lines.

What is checked where, and why, is told in :mod:`fanout.avro_check`.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import struct
import tempfile
import threading
import time as time_module
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.write import Writer

from fanout.avro_blocks import BlockPipeline, worth_it
from fanout.avro_check import RecordChecker, short
from fanout.errors import PermanentError, RecordError, SchemaError, UserError
from fanout.filestamp import Stamp, stamp_of

__all__ = [
    "Encoded",
    "RecordWriter",
    "Schema",
    "load_schema",
    "read_records",
    "to_json_safe",
]


class Schema:
    """A loaded Avro record schema.

    Attributes:
        name: the record's full name (``namespace.name``).
        raw: the schema as JSON-able data, exactly as loaded (for run manifests).
        parsed: fastavro's ``parse_schema`` result, for writing.
        path: the ``.avsc`` file it came from, or None for an inline schema.
    """

    __slots__ = ("_checker", "name", "parsed", "path", "raw")

    def __init__(self, raw: dict[str, Any], parsed: dict[str, Any], path: Path | None = None):
        self.raw = raw
        self.parsed = parsed
        self.name: str = parsed["name"]
        self.path = path
        self._checker: RecordChecker | None = None

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path is not None else ""
        return f"<Schema {self.name}{where}>"

    def checker(self) -> RecordChecker:
        """The record checker for this schema (built once, on first use)."""
        if self._checker is None:
            self._checker = RecordChecker(self.parsed)
        return self._checker


# ---------------------------------------------------------------------------
# Loading


_CACHE: dict[tuple[str, Stamp], Schema] = {}


def load_schema(
    spec: str | os.PathLike[str] | dict[str, Any],
    search_dirs: Sequence[str | os.PathLike[str]] = (),
) -> Schema:
    """Load an Avro record schema.

    Args:
        spec: an inline schema (a dict); a path to an ``.avsc`` file (a path
            object, or a str that contains a ``/`` or ends with ``.avsc``;
            relative paths are relative to the current directory); or a bare
            name such as ``"meter_reading"``, looked up as
            ``<dir>/meter_reading.avsc`` in each of ``search_dirs`` in order.
        search_dirs: directories to look up bare names in.

    Returns:
        The schema. Files are cached by resolved path, mtime, ctime, size and
        inode (a copy that keeps the mtime, ``cp -p``, still changes the ctime).

    Raises:
        SchemaError: the schema cannot be found, is not valid JSON, does not
            parse, or is not a record. The message is one line naming the
            schema and the problem.
    """
    if isinstance(spec, dict):
        return _build(copy.deepcopy(spec), "inline schema", None)
    if (
        isinstance(spec, str)
        and "/" not in spec
        and os.sep not in spec
        and not spec.endswith(".avsc")
    ):
        return _load_file(_find_by_name(spec, search_dirs))
    path = Path(spec)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise SchemaError(f"schema file {path} {what}")
    return _load_file(path)


def _find_by_name(name: str, search_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    if not name:
        raise SchemaError("schema name is empty")
    for directory in search_dirs:
        candidate = Path(directory) / f"{name}.avsc"
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d) for d in search_dirs) or "no schema directories given"
    raise SchemaError(f"schema {name!r} not found (looked in: {looked})")


def _load_file(path: Path) -> Schema:
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError as exc:
        raise SchemaError(f"schema file {path} cannot be read: {exc.strerror}") from None
    key = (str(resolved), stamp_of(st))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError(f"schema file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SchemaError(
            f"schema file {path} is not valid JSON: not UTF-8 ({exc.reason})"
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(
            f"schema file {path} is not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    schema = _build(raw, f"schema file {path}", path)
    _CACHE[key] = schema
    return schema


def _build(raw: Any, what: str, path: Path | None) -> Schema:
    if not isinstance(raw, dict) or raw.get("type") != "record":
        kind = raw.get("type") if isinstance(raw, dict) else raw
        raise SchemaError(f"{what} must be an Avro record, not {short(kind)}")
    if not isinstance(raw.get("fields"), list):
        raise SchemaError(f"{what} does not parse: the record has no 'fields' list")
    try:
        parsed: dict[str, Any] = fastavro.parse_schema(copy.deepcopy(raw))  # type: ignore[assignment]
    except Exception as exc:  # fastavro raises several unrelated types
        message = " ".join(str(exc).split())
        if type(exc).__name__ == "UnknownType":
            message = f"unknown type {message}"
        raise SchemaError(f"{what} does not parse: {message}") from None
    return Schema(raw, parsed, path)


# ---------------------------------------------------------------------------
# Writing


#: Bytes of records per Avro block, before compression: Avro's own (Java)
#: default. fastavro's 16,000 compresses each block on its own too soon: the
#: meter-readings output is 13% larger with it, at the same speed.
SYNC_INTERVAL = 64_000

#: A chunk's Avro file is built in memory up to this size, then moved to a
#: temporary file (in ``tempfile``'s directory: $TMPDIR, /tmp on Lambda), so a
#: chunk that emits gigabytes needs that much disk, not memory.
SPILL_BYTES = 8 * 1024 * 1024

#: Encoded bytes between two column-wise checks at most, beside ``batch_size``:
#: a batch keeps the records it has not checked alive, and 8,192 records of a
#: megabyte each would be 8 GB. Looked at every ``_LOOK_EVERY`` records.
CHECK_BYTES = 4 * 1024 * 1024
_LOOK_EVERY = 64
#: The current thread's id (bound here: the hot path calls it once a record).
_thread_id = threading.get_ident


class Encoded:
    """A finished Avro file: its size, and its bytes to read (in memory, or in a
    temporary file past :data:`SPILL_BYTES`). False when it is empty."""

    __slots__ = ("_file", "size")

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file = file
        #: The file's length in bytes.
        self.size = size

    def __bool__(self) -> bool:
        return self.size > 0

    def file(self) -> BinaryIO:
        """The file, from its start (each call rewinds it): for ``Store.put``."""
        self._file.seek(0)
        return cast(BinaryIO, self._file)

    def read(self) -> bytes:
        """The whole file in memory."""
        return self.file().read()

    def close(self) -> None:
        """Let the file go (a temporary file is deleted)."""
        self._file.close()


#: How long finish waits for an add a thread left running has in flight (s).
IN_FLIGHT_WAIT = 5.0


def wait_out(in_flight: Callable[[], bool]) -> None:
    """Wait until ``in_flight()`` is false (an add under way in a thread the
    job left running ends: microseconds, unless it was descheduled), for at
    most :data:`IN_FLIGHT_WAIT`; then RuntimeError (the attempt fails and is
    retried), not a file finished beside a block write."""
    deadline = time_module.monotonic() + IN_FLIGHT_WAIT
    while in_flight():
        if time_module.monotonic() > deadline:
            raise RuntimeError("a thread the job left running was still adding a record")
        time_module.sleep(0.0005)


class OneThread:
    """Whose records a writer takes: those of one thread at a time, the first
    to add one, or the next once it has ended. Records from two threads at once
    interleaved fastavro's block writes and the batch's check, and runs
    succeeded with corrupt files. A check rather than a lock on the hot path:
    it costs ~1% of an add(), a lock about ten times as much
    (tests/bench/bench_avro.py), and jobs emit from one thread."""

    def __init__(self) -> None:
        #: The thread whose records are taken (its ``threading.get_ident()``).
        self.owner: int | None = None
        self._thread: threading.Thread | None = None
        self._adopting = threading.Lock()

    def take(self) -> None:
        """The calling thread's records are taken from now on (and no other's)."""
        with self._adopting:
            self.owner, self._thread = _thread_id(), threading.current_thread()

    def refusal(self) -> PermanentError | None:
        """None if the calling thread may add (it becomes the owner, if there
        was none or the owner has ended), else why not; for a caller whose
        thread is not :attr:`owner`. (An ended thread's id may be reused: the
        check on the id alone took a second thread as the first, or not, by chance.)"""
        with self._adopting:
            if self.owner is None or (self._thread is not None and not self._thread.is_alive()):
                self.owner, self._thread = _thread_id(), threading.current_thread()
            if self.owner == _thread_id():
                return None
        return PermanentError(
            "ctx.emit() called from a second thread: records must come from one"
            " thread at a time (emit in process() what the threads return, e.g. `for rows"
            " in pool.map(work, items): ...`), or from a thread left running after"
            " the chunk ended"
        )


class RecordWriter:
    """Accumulates records and produces one Avro object container file.

    ``add`` is the hot path (called once per emitted record): it encodes the
    record into the current block at once, by fastavro without per-record
    validation, so what is written is the record as it was when added (a job
    may reuse or change its dict afterwards), and a record fastavro cannot
    encode (a missing field, a key that is no field, a value of the wrong
    kind) raises there. The file is built in memory, and in a temporary file
    past :data:`SPILL_BYTES`. It keeps a shallow copy, and every ``batch_size``
    records (or :data:`CHECK_BYTES` of output), and at :meth:`finish_file`, the
    copies are checked column-wise for the
    values fastavro would have coerced silently (see :mod:`fanout.avro_check`):
    a value nested in a list or dict that the job changes after the call is
    checked as changed, though written as it was. A record that
    does not fit raises :class:`RecordError` naming its 0-based index among
    the records added to this writer and the offending field; the writer is
    unusable afterwards, as it is after a MemoryError or OSError (a full disk),
    which are raised as they are: no fault of the record's. Where a core is
    spare, blocks are compressed in a thread (:mod:`fanout.avro_blocks`).

    Args:
        schema: the record schema.
        codec: an Avro codec fastavro supports (``"null"``, ``"deflate"``, ...).
        batch_size: records per column-wise check (keyword-only).
    """

    def __init__(self, schema: Schema, codec: str = "deflate", *, batch_size: int = 8192):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.schema = schema
        self.codec = codec
        self._batch_size = batch_size
        #: The records encoded since the last column-wise check, for the next.
        self._batch: list[dict[str, Any]] = []
        self._checked = 0
        self._checker = schema.checker()
        # Closed by the Encoded that finish_file() returns (or with the writer).
        self._buf: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPILL_BYTES)  # noqa: SIM115
        #: The file's size at which the batch is checked, whatever its length.
        self._check_at = CHECK_BYTES
        #: The batch length at which add() looks whether to check the batch:
        #: every _LOOK_EVERY records, so the hot path makes one comparison.
        self._look_at = min(batch_size, _LOOK_EVERY)
        # Blocks are compressed in a thread where that can gain (avro_blocks):
        # fastavro writes its header through it at once, then hands blocks over
        # (it is file enough for fastavro: write, flush, seekable).
        self._pipe = BlockPipeline(self._buf) if worth_it(codec) else None
        out = cast(IO[bytes], self._pipe) if self._pipe is not None else self._buf
        # strict_allow_default: fastavro raises for keys that are not fields and
        # for missing fields without a default (at no measurable cost), where
        # it would otherwise drop the former and write null for the latter.
        self._writer = Writer(  # ValueError on an unknown codec
            out,
            schema.parsed,
            codec=codec,
            sync_interval=SYNC_INTERVAL,
            options={"strict_allow_default": True},
        )
        if self._pipe is not None:
            self._pipe.take_blocks_of(self._writer)
        self._write = self._writer.write
        self._failure: Exception | None = None
        self._result: Encoded | None = None
        self._thread = OneThread()
        self._in_add = False

    @property
    def count(self) -> int:
        """How many records have been added."""
        return self._checked + len(self._batch)

    @property
    def size(self) -> int:
        """Bytes of the file so far (what its commit will write, roughly)."""
        if self._result is not None:
            return self._result.size
        try:
            return self._buf.tell()
        except ValueError:  # closed: an empty file, or a failed writer
            return 0

    def add(self, record: dict[str, Any]) -> None:
        """Add one record (a dict whose keys are the schema's field names).

        Records come from one thread, the first to add one: from another,
        PermanentError, and the writer fails (its file is not committed).

        Raises:
            RecordError: the record cannot be encoded in the schema; or this
                call completes a batch and a record of it does not fit.
        """
        # In flight, then the owner check: finish_file() takes the writer, then
        # waits out an add in flight, so one of the two sees the other (under
        # the GIL). A thread left running had passed its check, and its block
        # write ran beside the flush: runs succeeded with corrupt files.
        self._in_add = True
        try:
            if _thread_id() != self._thread.owner and (refused := self._thread.refusal()):
                raise self._fail(refused)
            try:
                self._write(record)
                # A copy for the batch's check: a job may reuse its dict (or clear
                # it) after the call, and the check must see what was written.
                kept = record.copy()
            except (MemoryError, OSError) as exc:
                # Not the record's fault (memory, a full disk past SPILL_BYTES, a
                # block the compression thread failed): a transient failure, not a
                # permanent RecordError. The writer is unusable all the same.
                self._check_usable()
                raise self._fail(exc) from None
            except Exception as exc:  # fastavro raises TypeError/ValueError/KeyError/...
                self._check_usable()
                self._bad_write(record, exc)
            batch = self._batch
            batch.append(kept)
            if len(batch) >= self._look_at:
                self._look()
        finally:
            self._in_add = False

    def finish_file(self) -> Encoded:
        """Check the pending records and return the whole Avro file (empty, and
        false, if no record was added, so the caller can skip it). Calling it
        again returns the same; ``add`` afterwards raises. The caller closes it.

        Raises:
            RecordError: a pending record does not fit the schema.
        """
        if self._result is not None:
            return self._result
        # A thread the job left running adds no more (a record added after
        # the count was taken would be lost or, amid a block, corrupt the file).
        self._thread.take()
        try:
            wait_out(lambda: self._in_add)
        except RuntimeError as exc:
            raise self._fail(exc) from None
        self._check_usable()
        if self._batch:
            self._check_batch()
        if self._checked == 0:
            self._buf.close()
            self._result = Encoded(io.BytesIO(), 0)
        else:
            try:
                self._writer.flush()
                if self._pipe is not None:
                    self._pipe.drain()
            except Exception as exc:
                # (a full disk): fastavro's block is half handed over, so a
                # second call would write it twice. The writer is done.
                raise self._fail(exc) from None
            self._result = Encoded(self._buf, self._buf.tell())
        self._write = self._refuse
        return self._result

    def finish(self) -> bytes:
        """:meth:`finish_file`, read into memory: b"" if no record was added."""
        return self.finish_file().read()

    # -- internals ----------------------------------------------------------

    def _refuse(self, record: object) -> None:
        raise RuntimeError("RecordWriter.add() called after finish() or a failure")

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._result is not None:
            raise RuntimeError("RecordWriter.add() called after finish()")

    def _fail(self, exc: Exception) -> Exception:
        """Remember the failure: from now on every add() and finish() raises it.
        (The block buffer may hold part of a record: the writer is done.)"""
        self._failure = exc
        self._write = self._refuse
        return exc

    def _bad_write(self, record: Any, exc: Exception) -> None:
        """fastavro could not encode ``record``: raise RecordError saying why,
        in the checker's words where it has them; or for an earlier record of
        the batch, not yet checked, that does not fit either (the first is named)."""
        self._check_batch()
        problem = self._checker.explain(record)
        if problem is None:
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())
        index = self.count
        raise self._fail(
            RecordError(f"record {index} does not fit schema {self.schema.name}: {problem}")
        ) from exc

    def _look(self) -> None:
        """Check the batch if it is full, or holds :data:`CHECK_BYTES` of output."""
        if len(self._batch) >= self._batch_size or self._buf.tell() >= self._check_at:
            self._check_batch()
        else:
            self._look_at = min(self._batch_size, self._look_at + _LOOK_EVERY)

    def _check_batch(self) -> None:
        batch = self._batch
        if not self._checker.batch_ok(batch):
            for offset, record in enumerate(batch):
                problem = self._checker.explain(record)
                if problem is not None:
                    raise self._fail(
                        RecordError(
                            f"record {self._checked + offset} does not fit schema "
                            f"{self.schema.name}: {problem}"
                        )
                    )
        self._checked += len(batch)
        self._batch = []
        self._check_at = self._buf.tell() + CHECK_BYTES
        self._look_at = min(self._batch_size, _LOOK_EVERY)


# ---------------------------------------------------------------------------
# Reading


#: What fastavro raises for a file that is not whole Avro: truncated (EOFError),
#: a damaged block (zlib.error, ValueError for a missing sync marker), bytes
#: that decode to nonsense (IndexError, KeyError, TypeError, UnicodeDecodeError,
#: struct.error), records no reader schema can take, or a value Python cannot
#: hold (OverflowError: a timestamp past year 9999, from a file written before
#: fanout refused one).
_UNREADABLE = (
    EOFError,
    ValueError,
    OverflowError,
    zlib.error,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    SchemaResolutionError,
)


def read_records(
    data: BinaryIO, name: str = "", reader_schema: Any = None
) -> Iterator[dict[str, Any]]:
    """Yield the records of an Avro object container file (read as
    ``reader_schema``, if given, else as written).

    Timestamps come back as aware UTC datetimes, dates as ``date``, decimals as
    ``Decimal`` (see :func:`to_json_safe` to print them as JSON). A file that
    cannot be read (truncated, a damaged block, not Avro) is a
    :class:`UserError` naming it (``name``, its store key) and what is wrong,
    where fastavro raised zlib.error, EOFError (which click takes for Ctrl-D:
    "aborted", exit 130) or ValueError.
    """
    try:
        yield from fastavro.reader(data, reader_schema=reader_schema)  # type: ignore[misc]
    except _UNREADABLE as exc:  # not OSError or MemoryError: no fault of the file's
        what = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise UserError(f"file {name or '(unnamed)'} cannot be read as Avro: {what}") from None


def to_json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a record that ``json.dumps`` accepts, for printing.

    datetime, date and time become ISO 8601 strings (a datetime keeps its
    timezone, e.g. ``2024-01-01T00:15:00+00:00``); Decimal and UUID become
    strings; bytes become base64 strings; NaN and infinities become the
    strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (strict JSON has no
    such numbers); tuples become lists. Lists and dicts are converted
    recursively.
    """
    return {str(key): _json_safe(value) for key, value in record.items()}


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Iterable):
        return [_json_safe(v) for v in value]
    return value
