"""Checking Avro records cheaply, for :class:`fanout.avro.RecordWriter`.

fastavro's own per-record validation (``validator=True``) costs ~40-70% of the
write time, so :class:`RecordWriter` writes *without* it and instead:

* at ``add`` time, fastavro encodes the record unvalidated into the current
  block (so what is written is the record as added, whatever the job does to
  its dict afterwards), and raises for what it cannot encode; a shallow copy
  of the record is kept for the batch's check (~2% of the write; even a type
  check per record would cost ~0.5%);
* at batch time (every ``batch_size`` records and at ``finish``), the records
  added since are checked column-wise (C-speed ``map``/``set``/``min``/``max``
  over one field of the whole batch; only a nested value changed after the
  ``add`` is checked as changed) for the cases where
  fastavro's unvalidated writer silently accepts a wrong value, coercing it
  instead of raising, or writes a file it cannot read back:

  - ``float``/``double`` fields: fastavro calls ``float(value)``, so the string
    ``"1.5"``, ``True`` and ``Decimal("1.5")`` are written as numbers. Only
    ``int`` and ``float`` (and other ``numbers.Real`` except ``bool``) pass.
  - ``int``/``long`` fields: floats are truncated (``1.7`` is written as ``1``),
    ``True`` is written as ``1``; an ``int`` field takes any 64-bit value
    (``2**40`` is written, and breaks readers that honour the schema). Only
    ints (not bools) pass, within the 32-bit range for ``int``.
  - ``float`` (32-bit) fields: values beyond +-3.4e38 are written as infinity.
  - ``boolean`` fields: any value is written by truthiness (``"no"`` -> true,
    ``None`` -> false). Only ``bool`` passes.
  - ``timestamp-*``: floats are truncated, a naive datetime is taken as UTC:
    only aware datetimes and ints pass. ``date``: a datetime is truncated to
    its date: rejected. ``time-*``: only ``datetime.time`` and ints pass.
  - values outside years 1-9999 in UTC (raw ints, or an aware datetime whose
    offset takes it past them) or outside a day (times) are written, and the
    file can then not be read back: rejected.
  - ``uuid`` strings are written unchecked (a malformed one makes the file
    unreadable), and a decimal's precision is counted on the digits given, not
    at the schema's scale: checked.
  - arrays: any iterable is accepted (a str becomes a list of characters):
    only lists and tuples pass. The same inside records, arrays, maps, unions.

* fastavro is asked (``strict_allow_default``) to raise for record keys that
  are not fields (it would drop a misspelt optional field's data) and for
  missing fields without a default (it would write null for a union with
  ``"null"``), at no measurable cost; a missing field with one gets it.

* everything else is left to fastavro, which raises on its own when it writes
  the batch: non-strings for strings (or ones UTF-8 cannot encode), non-bytes
  for bytes, unknown enum symbols, fixed of the wrong size, decimals of the
  wrong type or scale, bad ISO date strings, non-string map keys, values too
  large for a long, and union values that match no branch.

Whenever a batch check fails or fastavro raises, the batch is re-examined
record by record (strictly, then by writing each record alone) to find the
first offending record: :class:`RecordError` names its index and field. Values
of other types that are fine (a numpy float) take that slow path, not failing.
"""

from __future__ import annotations

import math
import numbers
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, time
from decimal import Decimal
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any

SchemaNode = Any  # a node of a parsed schema: str (primitive or name), list (union) or dict
_Column = Callable[[], Iterator[Any]]  # returns a fresh iterator over one column of a batch


_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = 3.4028234663852886e38
_TIMESTAMPS = frozenset({"timestamp-millis", "timestamp-micros", "timestamp-nanos"})
_LOCAL_TIMESTAMPS = frozenset(
    {"local-timestamp-millis", "local-timestamp-micros", "local-timestamp-nanos"}
)
_NONE = type(None)
_UUID_RE = re.compile(
    r"(?:urn:uuid:)?\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
    r"[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?"
)
_EPOCH_DAYS = date(1970, 1, 1).toordinal()
#: The instants an aware datetime of a timestamp may hold (Python's, in UTC),
#: and in seconds from the epoch, the second after the last one's included.
_FIRST_UTC = datetime(1, 1, 1, tzinfo=UTC)
_LAST_UTC = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
_MIN_SECONDS = (date.min.toordinal() - _EPOCH_DAYS) * 86400
_END_SECONDS = (date.max.toordinal() - _EPOCH_DAYS + 1) * 86400
# Ints a logical type can hold and still be read back as a Python value.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "date": (date.min.toordinal() - _EPOCH_DAYS, date.max.toordinal() - _EPOCH_DAYS),
    "time-millis": (0, 86_400_000 - 1),
    "time-micros": (0, 86_400_000_000 - 1),
}
for _unit, _scale in (("millis", 1000), ("micros", 1_000_000), ("nanos", 1_000_000_000)):
    for _prefix in ("timestamp", "local-timestamp"):
        _INT_RANGES[f"{_prefix}-{_unit}"] = (_MIN_SECONDS * _scale, _END_SECONDS * _scale - 1)

# Exact Python types that pass the fast column check for each lenient type
# (anything else goes to the strict per-record check, which decides).
_FAST_TYPES: dict[str, frozenset[type]] = {
    "null": frozenset({_NONE}),
    "boolean": frozenset({bool}),
    "int": frozenset({int}),
    "long": frozenset({int}),
    "float": frozenset({float, int}),
    "double": frozenset({float, int}),
    "timestamp": frozenset({datetime, int}),
    "local-timestamp": frozenset({datetime, int}),
    "date": frozenset({date, int, str}),
    "time": frozenset({time, int}),
}


class RecordChecker:
    """Record checks for one parsed schema.

    ``batch_ok`` is the fast, conservative, column-wise check of a batch: True
    means every record is fine as far as the cases fastavro would silently
    accept go; False means "look closer". ``explain`` is the strict per-record
    check that produces the message.
    """

    def __init__(self, parsed: dict[str, Any]):
        self._top = parsed
        self._named: dict[str, Any] = parsed.get("__named_schemas", {})
        self._needs: dict[int, bool] = {}
        self._plans: dict[int, list[tuple[str, Any, bool]]] = {}

    # -- fast path ------------------------------------------------------------

    def batch_ok(self, batch: list[dict[str, Any]]) -> bool:
        """Whether the batch passes the column checks (see the module docstring)."""
        try:
            return self._record_column_ok(batch, self._top, top=True)
        except Exception:  # an odd value (e.g. one whose comparisons raise): look closer
            return False

    def _resolve(self, node: SchemaNode) -> SchemaNode:
        while isinstance(node, str) and node in self._named:
            node = self._named[node]
        return node

    def _needs_check(self, node: SchemaNode, seen: frozenset[int] = frozenset()) -> bool:
        """Whether values of this type need a column check at all."""
        node = self._resolve(node)
        if isinstance(node, str):
            return node in _FAST_TYPES
        key = id(node)
        cached = self._needs.get(key)
        if cached is not None:
            return cached
        if key in seen:  # recursive type: its fields are checked where they recur
            return False
        seen = seen | {key}
        if isinstance(node, list):
            # fastavro resolves a union by validating the value against each
            # branch, which is strict for primitives (and the int range); what
            # slips through: the contents of records/arrays/maps, naive or
            # truncated datetimes, float overflow, and a decimal's precision.
            result = any(
                self._needs_check(branch, seen)
                for branch in map(self._resolve, node)
                if _is_container(branch)
                or branch == "float"
                or (
                    isinstance(branch, dict)
                    and (
                        _logical_kind(branch.get("logicalType", "")) is not None
                        or branch.get("logicalType") in ("uuid", "decimal")
                    )
                )
            )
        else:
            kind = node["type"]
            logical = node.get("logicalType")
            if kind in ("array", "map", "record", "error") or logical in ("uuid", "decimal"):
                result = True
            elif kind in ("enum", "fixed"):
                result = False
            elif logical is not None and _logical_kind(logical) is not None:
                result = True
            else:
                result = self._needs_check(kind, seen)
        self._needs[key] = result
        return result

    def _record_plan(self, node: dict[str, Any]) -> list[tuple[str, Any, bool]]:
        """(name, type, required) of the record's fields that need a column check."""
        plan = self._plans.get(id(node))
        if plan is None:
            plan = [
                (f["name"], f["type"], _required(f))
                for f in node["fields"]
                if self._needs_check(f["type"])
            ]
            self._plans[id(node)] = plan
        return plan

    def _record_column_ok(self, values: list[Any], node: dict[str, Any], top: bool = False) -> bool:
        if not top and not set(map(type, values)) <= {dict}:
            return False
        checked = self._record_plan(node)
        try:
            for name, field_type, required in checked:
                if required:  # a missing one raises KeyError
                    column: _Column = partial(map, itemgetter(name), values)
                else:
                    present = [v[name] for v in values if name in v]
                    if not present:
                        continue
                    column = partial(iter, present)
                if not self._column_ok(column, field_type):
                    return False
        except (KeyError, TypeError):
            return False
        return True

    def _column_ok(self, column: _Column, node: SchemaNode) -> bool:
        """Check a non-empty column; ``column()`` returns a fresh iterator over it.

        A column is rebuilt for each pass rather than materialised: one
        ``map(itemgetter)`` pass per check is cheaper than a list.
        """
        node = self._resolve(node)
        if isinstance(node, str):
            return _primitive_column_ok(column, node)
        if isinstance(node, list):
            return self._union_column_ok(list(column()), node)
        kind = node["type"]
        logical = node.get("logicalType")
        if logical is not None:
            lkind = _logical_kind(logical)
            if lkind == "timestamp":
                # The common case in one pass: datetimes only compare with
                # datetimes, and naive with aware ones raises TypeError, so if
                # min() succeeds and gives an aware datetime, all are aware
                # datetimes. (Anything else gets the full check below.)
                try:
                    earliest = min(column())
                except TypeError:
                    return False
                if type(earliest) is datetime:
                    # (in UTC, as written: year 1 at +01:00 is year 0, and the
                    # file could not be read back)
                    return (
                        earliest.tzinfo is not None
                        and earliest >= _FIRST_UTC
                        and max(column()) <= _LAST_UTC
                    )
            if lkind is not None:
                types = set(map(type, column()))
                if not types <= _FAST_TYPES[lkind]:
                    return False
                if int in types:
                    # Raw ints: fastavro writes any long, but cannot read back
                    # one outside Python's date/time range.
                    low, high = _INT_RANGES[logical]
                    ints = [v for v in column() if type(v) is int]
                    if min(ints) < low or max(ints) > high:
                        return False
                if lkind == "timestamp" and datetime in types:
                    # Comparing naive with aware datetimes raises TypeError, so
                    # the minimum is aware iff they all are.
                    times = [v for v in column() if type(v) is datetime]
                    earliest = min(times)
                    return (
                        earliest.tzinfo is not None
                        and earliest >= _FIRST_UTC
                        and max(times) <= _LAST_UTC
                    )
                return True
            if logical == "uuid":
                # fastavro writes any string, and then cannot read the file back.
                types = set(map(type, column()))
                if not types <= {str, uuid.UUID}:
                    return False
                if str in types:
                    strings = (v for v in column() if type(v) is str)
                    return all(map(_UUID_RE.fullmatch, strings))
                return True
            if logical == "decimal":
                # fastavro counts the digits as given, not at the schema's scale:
                # Decimal('123456789.1') passed decimal(10,2) (11 digits), and
                # readers that hold to the precision (Spark, Athena) fail on it.
                return all(_explain_logical(v, node, logical, "") is None for v in column())
        if kind in ("record", "error"):
            return self._record_column_ok(list(column()), node)
        if kind == "array":
            if not set(map(type, column())) <= {list, tuple}:
                return False
            if not self._needs_check(node["items"]):
                return True
            items = list(chain.from_iterable(column()))
            return not items or self._column_ok(partial(iter, items), node["items"])
        if kind == "map":
            if not set(map(type, column())) <= {dict}:
                return False
            if not self._needs_check(node["values"]):
                return True
            items = list(chain.from_iterable(map(dict.values, column())))
            return not items or self._column_ok(partial(iter, items), node["values"])
        if kind in ("enum", "fixed"):
            return True
        return self._column_ok(column, kind)

    def _union_column_ok(self, values: list[Any], branches: list[Any]) -> bool:
        # Values are grouped by Python type; a group that only one branch can
        # hold is checked against that branch column-wise, a group no branch
        # can hold makes fastavro raise, and an ambiguous group goes through
        # the strict check value by value.
        by_type: dict[type, list[Any]] = {}
        for value in values:
            by_type.setdefault(type(value), []).append(value)
        for pytype, group in by_type.items():
            candidates = [b for b in branches if _could_hold(self._resolve(b), pytype)]
            if len(candidates) == 1:
                if not self._column_ok(partial(iter, group), candidates[0]):
                    return False
            elif candidates and any(self._explain(v, branches, "") is not None for v in group):
                return False
        return True

    # -- strict path ----------------------------------------------------------

    def explain(self, record: Any) -> str | None:
        """The first problem with one record, as ``field <path>: <problem>``, or None."""
        if not isinstance(record, Mapping):
            return f"a record must be a dict, got {type(record).__name__} {short(record)}"
        return self._explain_record(record, self._top, "")

    def _explain_record(self, value: Any, node: dict[str, Any], path: str) -> str | None:
        fields = node["fields"]
        names = {f["name"] for f in fields}
        extra = [k for k in value if k not in names]
        if extra:
            where = f"{path}.{extra[0]}" if path else str(extra[0])
            known = ", ".join(f["name"] for f in fields)
            return f"field {where} is not in the schema (fields: {known})"
        for field in fields:
            name = field["name"]
            field_path = f"{path}.{name}" if path else name
            if name not in value:
                if _required(field):
                    return f"field {field_path}: missing (the schema gives no default)"
                continue
            problem = self._explain(value[name], field["type"], field_path)
            if problem is not None:
                return problem
        return None

    def _explain(self, value: Any, node: SchemaNode, path: str) -> str | None:
        node = self._resolve(node)
        if isinstance(node, list):
            for branch in node:
                if self._explain(value, branch, path) is None:
                    return None
            real = [b for b in node if self._resolve(b) != "null"]
            if len(real) == 1 and len(node) == 2 and value is not None:
                return self._explain(value, real[0], path)
            return _bad(path, value, f"does not match any of {_type_names(node)}")
        if isinstance(node, str):
            return _explain_primitive(value, node, path)
        kind = node["type"]
        logical = node.get("logicalType")
        if logical is not None:
            problem = _explain_logical(value, node, logical, path)
            if problem != "":
                return problem
        if kind in ("record", "error"):
            if not isinstance(value, Mapping):
                return _bad(path, value, f"is not a record ({node['name']}): expected a dict")
            return self._explain_record(value, node, path)
        if kind == "array":
            if not isinstance(value, (list, tuple)):
                return _bad(path, value, "is not an array: expected a list")
            for i, item in enumerate(value):
                problem = self._explain(item, node["items"], f"{path}[{i}]")
                if problem is not None:
                    return problem
            return None
        if kind == "map":
            if not isinstance(value, Mapping):
                return _bad(path, value, "is not a map: expected a dict")
            for key, item in value.items():
                if not isinstance(key, str):
                    return _bad(path, key, "is not a map key: keys must be strings")
                problem = self._explain(item, node["values"], f"{path}[{key!r}]")
                if problem is not None:
                    return problem
            return None
        if kind == "enum":
            if value not in node["symbols"] or not isinstance(value, str):
                symbols = ", ".join(node["symbols"])
                return _bad(path, value, f"is not a symbol of enum {node['name']} ({symbols})")
            return None
        if kind == "fixed":
            if not isinstance(value, (bytes, bytearray)) or len(value) != node["size"]:
                return _bad(path, value, f"is not {node['size']} bytes (fixed {node['name']})")
            return None
        return self._explain(value, kind, path)


def _required(field: Mapping[str, Any]) -> bool:
    """Whether a record must have the field (it has no default)."""
    return "default" not in field


def _logical_kind(logical: str) -> str | None:
    if logical in _TIMESTAMPS:
        return "timestamp"
    if logical in _LOCAL_TIMESTAMPS:
        return "local-timestamp"
    if logical == "date":
        return "date"
    if logical in ("time-millis", "time-micros"):
        return "time"
    return None


def _primitive_column_ok(column: _Column, kind: str) -> bool:
    allowed = _FAST_TYPES.get(kind)
    if allowed is None:  # string, bytes: fastavro raises on a wrong type
        return True
    if not set(map(type, column())) <= allowed:
        return False
    if kind == "int":
        return bool(min(column()) >= _INT_MIN and max(column()) <= _INT_MAX)
    if kind == "float":
        # NaN makes max() unreliable but never hides an overflow: it either
        # comes out as the max (and fails the test) or is skipped.
        return bool(max(map(abs, column())) <= _FLOAT_MAX)
    return True


def _could_hold(node: SchemaNode, pytype: type) -> bool:
    """Whether a value of this Python type could be written as this union branch."""
    if isinstance(node, list):
        return False
    kind, logical = (
        (node, None) if isinstance(node, str) else (node["type"], node.get("logicalType"))
    )
    allowed: tuple[type, ...]
    lkind = _logical_kind(logical) if logical else None
    if lkind is not None:
        allowed = tuple(_FAST_TYPES[lkind])
    elif logical == "decimal":
        allowed = (Decimal,)
    elif logical == "uuid":
        allowed = (uuid.UUID, str)
    elif kind in ("record", "error", "map"):
        allowed = (dict,)
    elif kind == "array":
        allowed = (list, tuple)
    elif kind in ("enum", "string"):
        allowed = (str,)
    elif kind in ("fixed", "bytes"):
        allowed = (bytes, bytearray, memoryview)
    elif kind in _FAST_TYPES:
        allowed = tuple(_FAST_TYPES[kind])
    else:
        return True
    return issubclass(pytype, allowed)


def _is_container(node: SchemaNode) -> bool:
    return isinstance(node, dict) and node["type"] in ("record", "error", "array", "map")


def _type_names(branches: list[Any]) -> str:
    names = []
    for branch in branches:
        if isinstance(branch, dict):
            names.append(str(branch.get("name") or branch.get("logicalType") or branch["type"]))
        else:
            names.append(str(branch))
    return ", ".join(names)


def _bad(path: str, value: Any, problem: str) -> str:
    return f"field {path}: {short(value)} {problem}"


def _explain_primitive(value: Any, kind: str, path: str) -> str | None:
    if kind == "null":
        return None if value is None else _bad(path, value, "is not null")
    if kind == "boolean":
        return None if isinstance(value, bool) else _bad(path, value, "is not a boolean")
    if kind in ("int", "long"):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return _bad(path, value, f"is not an {kind}" if kind == "int" else "is not a long")
        low, high = (_INT_MIN, _INT_MAX) if kind == "int" else (_LONG_MIN, _LONG_MAX)
        if not low <= int(value) <= high:
            bits = 32 if kind == "int" else 64
            return _bad(path, value, f"is out of range for {kind} ({bits}-bit)")
        return None
    if kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _bad(path, value, f"is not a {kind}")
        if kind == "float" and math.isfinite(value) and abs(float(value)) > _FLOAT_MAX:
            return _bad(path, value, "is out of range for float (32-bit)")
        return None
    if kind == "string":
        if not isinstance(value, str):
            return _bad(path, value, "is not a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return _bad(path, value, f"cannot be encoded as UTF-8 ({exc.reason})")
        return None
    if kind == "bytes":
        if isinstance(value, (bytes, bytearray, memoryview)):
            return None
        return _bad(path, value, "is not bytes")
    return None  # unknown: leave it to fastavro


def _explain_logical(value: Any, node: Mapping[str, Any], logical: str, path: str) -> str | None:
    """The problem, None if fine, or "" to check it as its underlying type."""
    lkind = _logical_kind(logical)
    if lkind is not None:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            low, high = _INT_RANGES[logical]
            if not low <= int(value) <= high:
                span = "within a day" if lkind == "time" else "years 1 to 9999"
                return _bad(path, value, f"is out of range for {logical} ({span})")
            return None
        if lkind in ("timestamp", "local-timestamp"):
            if not isinstance(value, datetime):
                which = "an aware datetime" if lkind == "timestamp" else "a naive datetime"
                return _bad(path, value, f"is not a {logical} ({which} or an int)")
            if lkind == "timestamp" and value.tzinfo is None:
                return _bad(
                    path, value, "is a naive datetime: give it a timezone, e.g. tzinfo=timezone.utc"
                )
            if lkind == "timestamp" and not _FIRST_UTC <= value <= _LAST_UTC:
                return _bad(path, value, f"is out of range for {logical} (years 1 to 9999 in UTC)")
            return None
        if lkind == "date":
            if isinstance(value, datetime):
                return _bad(path, value, "is a datetime, not a date (the time would be lost)")
            if isinstance(value, str):
                try:
                    date.fromisoformat(value)
                except ValueError:
                    return _bad(path, value, "is not a date (nor an ISO 8601 date string)")
                return None
            return None if isinstance(value, date) else _bad(path, value, "is not a date")
        if isinstance(value, time):
            return None
        return _bad(path, value, f"is not a {logical} (a datetime.time or an int)")
    if logical == "decimal":
        if not isinstance(value, Decimal):
            return _bad(path, value, "is not a decimal.Decimal")
        _, digits, exponent = value.as_tuple()
        if not isinstance(exponent, int):
            return _bad(path, value, "is not a finite decimal")
        scale = int(node.get("scale", 0))
        precision = int(node.get("precision", 0))
        if -exponent > scale:
            return _bad(path, value, f"has more than {scale} decimal places (the schema's scale)")
        if precision and len(digits) + exponent + scale > precision:
            return _bad(path, value, f"has more than {precision} digits (the schema's precision)")
        return None
    if logical == "uuid":
        if isinstance(value, uuid.UUID):
            return None
        if not isinstance(value, str):
            return _bad(path, value, "is not a UUID")
        try:
            uuid.UUID(value)
        except ValueError:
            return _bad(path, value, "is not a UUID string (the file could not be read back)")
        return None
    return ""


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
