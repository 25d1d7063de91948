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
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import fastavro
from fastavro.write import Writer

from fanout.avro_check import RecordChecker, short
from fanout.errors import RecordError, SchemaError
from fanout.filestamp import Stamp, stamp_of

__all__ = [
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


class RecordWriter:
    """Accumulates records and produces one Avro object container file.

    ``add`` is the hot path (called once per emitted record): it only appends
    to a batch. Every ``batch_size`` records, and at :meth:`finish`, the batch
    is checked column-wise and written by fastavro without per-record
    validation (see the module docstring for what is checked where). A record
    that does not fit raises :class:`RecordError` naming its 0-based index
    among the records added to this writer and the offending field; the writer
    is unusable afterwards.

    Args:
        schema: the record schema.
        codec: an Avro codec fastavro supports (``"null"``, ``"deflate"``, ...).
        batch_size: records per batch (keyword-only).
    """

    def __init__(self, schema: Schema, codec: str = "deflate", *, batch_size: int = 8192):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.schema = schema
        self.codec = codec
        self._batch_size = batch_size
        self._batch: list[dict[str, Any]] = []
        self._written = 0
        self._checker = schema.checker()
        self._buf = io.BytesIO()
        # strict_allow_default: fastavro raises for keys that are not fields and
        # for missing fields without a default (at no measurable cost), where
        # it would otherwise drop the former and write null for the latter.
        self._writer = Writer(  # ValueError on an unknown codec
            self._buf,
            schema.parsed,
            codec=codec,
            sync_interval=SYNC_INTERVAL,
            options={"strict_allow_default": True},
        )
        self._failure: Exception | None = None
        self._result: bytes | None = None

    @property
    def count(self) -> int:
        """How many records have been added (written or pending)."""
        return self._written + len(self._batch)

    def add(self, record: dict[str, Any]) -> None:
        """Add one record (a dict whose keys are the schema's field names).

        Raises:
            RecordError: when this call completes a batch, a record of the
                batch does not fit the schema (or is not a dict).
        """
        batch = self._batch
        batch.append(record)
        if len(batch) >= self._batch_size:
            self._flush()

    def finish(self) -> bytes:
        """Write the pending records and return the whole Avro file.

        Returns b"" if no record was added, so the caller can skip the file.
        Calling it again returns the same bytes; ``add`` afterwards raises.

        Raises:
            RecordError: a pending record does not fit the schema.
        """
        if self._result is not None:
            return self._result
        if self._batch:
            self._flush()
        self._check_usable()
        if self._written == 0:
            self._result = b""
        else:
            self._writer.flush()
            self._result = self._buf.getvalue()
        self._buf = io.BytesIO()
        self._batch_size = 0  # any further add() goes to _flush(), which raises
        return self._result

    # -- internals ----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._result is not None:
            raise RuntimeError("RecordWriter.add() called after finish()")

    def _fail(self, exc: Exception) -> Exception:
        """Remember the failure: from now on every add() and finish() raises it."""
        self._failure = exc
        self._batch_size = 0  # any further add() goes to _flush(), which raises
        return exc

    def _flush(self) -> None:
        self._check_usable()
        batch = self._batch
        if not self._checker.batch_ok(batch):
            self._raise_first_bad(batch, None)  # returns if it was a false alarm
        try:
            deque(map(self._writer.write, batch), maxlen=0)
        except Exception as exc:  # fastavro raises TypeError/ValueError/KeyError/...
            self._raise_first_bad(batch, exc)
            # No record fails on its own: not a record problem (e.g. codec). The
            # block buffer may hold a partial record, so the writer is dead.
            self._fail(exc)
            raise
        self._written += len(batch)
        self._batch = []

    def _raise_first_bad(self, batch: list[dict[str, Any]], exc: Exception | None) -> None:
        """Raise RecordError for the first record of ``batch`` that does not fit.

        ``exc`` is the exception fastavro raised writing the batch (None if only
        the column checks complained). Returns if no record is at fault.
        """
        checker = self._checker
        parsed = self.schema.parsed
        for offset, record in enumerate(batch):
            problem = checker.explain(record)
            if problem is None and exc is not None:
                try:
                    fastavro.schemaless_writer(
                        io.BytesIO(), parsed, record, strict_allow_default=True
                    )
                except Exception as single:
                    problem = " ".join(f"{type(single).__name__}: {single}".split())
            if problem is not None:
                error = self._fail(
                    RecordError(
                        f"record {self._written + offset} does not fit schema "
                        f"{self.schema.name}: {problem}"
                    )
                )
                if exc is None:
                    raise error
                raise error from exc


# ---------------------------------------------------------------------------
# Reading


def read_records(data: BinaryIO) -> Iterator[dict[str, Any]]:
    """Yield the records of an Avro object container file.

    Timestamps come back as aware UTC datetimes, dates as ``date``, decimals as
    ``Decimal`` (see :func:`to_json_safe` to print them as JSON).
    """
    yield from fastavro.reader(data)  # type: ignore[misc]


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
