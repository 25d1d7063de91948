"""Avro schema resolution: can data written with one schema be read with another?

A pure function of two schemas (JSON, as in an ``.avsc`` file), following the
"Schema Resolution" section of the Avro specification (1.11/1.12):

- primitives must be the same type, or a **promotion**: int to long, float or
  double; long to float or double; float to double; string to bytes and back;
- records must have the same unqualified name (or the reader an alias of the
  writer's); a field of the reader that the writer lacks must have a
  **default**; a field of the writer that the reader lacks is ignored; fields
  present in both must resolve, recursively;
- enums: every symbol of the writer must be the reader's, unless the reader has a
  default symbol; fixed: same name and size; arrays and maps: their items /
  values must resolve;
- a union writer: every branch must resolve against the reader; a union reader:
  the writer (or each writer branch) must resolve against some branch;
- logical types do not take part (resolution works on the underlying types).

:func:`why_unreadable` returns None or one line naming the field and the rule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROMOTIONS", "why_unreadable"]

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
#: (writer, reader) pairs the specification allows besides identical types.
PROMOTIONS = frozenset(
    {
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)
_NAMED = ("record", "error", "enum", "fixed")


def why_unreadable(reader: Any, writer: Any) -> str | None:
    """None if every datum written with ``writer`` can be read with ``reader``;
    else one line saying where and why not (e.g. ``field 'kwh': double cannot be
    read as long (no such promotion)``)."""
    names: dict[str, Any] = {}
    _collect(reader, None, names, "r:")
    _collect(writer, None, names, "w:")
    return _Resolver(names).match(reader, writer, "", None, None)


def _fullname(schema: dict[str, Any], namespace: str | None) -> tuple[str, str | None]:
    name = str(schema.get("name", ""))
    if "." in name:
        return name, name.rsplit(".", 1)[0]
    ns = schema.get("namespace", namespace)
    return (f"{ns}.{name}" if ns else name), ns


def _collect(schema: Any, namespace: str | None, names: dict[str, Any], side: str) -> None:
    """Named types of one schema, by full and short name (prefixed by side,
    since reader and writer may define different types of the same name)."""
    if isinstance(schema, list):
        for branch in schema:
            _collect(branch, namespace, names, side)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if kind in _NAMED:
        full, ns = _fullname(schema, namespace)
        names[side + full] = (schema, ns)
        names.setdefault(side + full.rsplit(".", 1)[-1], (schema, ns))
        for field in schema.get("fields", []) if kind in ("record", "error") else []:
            _collect(field.get("type"), ns, names, side)
        return
    if kind == "array":
        _collect(schema.get("items"), namespace, names, side)
    elif kind == "map":
        _collect(schema.get("values"), namespace, names, side)
    elif isinstance(kind, dict | list):
        _collect(kind, namespace, names, side)


class _Resolver:
    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names

    def _deref(self, schema: Any, ns: str | None, side: str) -> tuple[Any, str | None]:
        """A named reference or a ``{"type": <schema>}`` wrapper, unwrapped."""
        while True:
            if isinstance(schema, str) and schema not in PRIMITIVES:
                full = schema if "." in schema or not ns else f"{ns}.{schema}"
                found = self.names.get(side + full) or self.names.get(side + schema)
                if found is None:
                    return schema, ns
                schema, ns = found
                continue
            if isinstance(schema, dict) and isinstance(schema.get("type"), dict | list):
                schema = schema["type"]
                continue
            if isinstance(schema, dict) and schema.get("type") in _NAMED:
                ns = _fullname(schema, ns)[1]
            return schema, ns

    @staticmethod
    def _kind(schema: Any) -> str:
        if isinstance(schema, list):
            return "union"
        if isinstance(schema, dict):
            return str(schema.get("type"))
        return str(schema)

    def match(self, r: Any, w: Any, path: str, rns: str | None, wns: str | None) -> str | None:
        r, rns = self._deref(r, rns, "r:")
        w, wns = self._deref(w, wns, "w:")
        rk, wk = self._kind(r), self._kind(w)
        where = f"field {path!r}: " if path else ""
        if wk == "union":
            for branch in w:
                problem = self.match(r, branch, path, rns, wns)
                if problem is not None:
                    return problem
            return None
        if rk == "union":
            for branch in r:
                if self.match(branch, w, path, rns, wns) is None:
                    return None
            return (
                f"{where}{_show(w)} cannot be read as {_show(r)}"
                " (no branch of the reader's union matches the writer)"
            )
        if rk != wk:
            if (wk, rk) in PROMOTIONS:
                return None
            return f"{where}{wk} cannot be read as {rk} (type changed; no such promotion in Avro)"
        if rk in PRIMITIVES:
            return None
        if rk in _NAMED and not _same_name(r, w):
            return (
                f"{where}{rk} {w.get('name')!r} cannot be read as {r.get('name')!r}"
                " (named types must have the same name, or the reader an alias)"
            )
        if rk == "array":
            return self.match(r.get("items"), w.get("items"), f"{path}[]", rns, wns)
        if rk == "map":
            return self.match(r.get("values"), w.get("values"), f"{path}{{}}", rns, wns)
        if rk == "fixed":
            if r.get("size") != w.get("size"):
                return f"{where}fixed size {w.get('size')} cannot be read as {r.get('size')}"
            return None
        if rk == "enum":
            missing = [s for s in w.get("symbols", []) if s not in r.get("symbols", [])]
            if missing and "default" not in r:
                return (
                    f"{where}enum symbol {missing[0]!r} is not the reader's"
                    " (the reader's enum has no default)"
                )
            return None
        if rk in ("record", "error"):
            return self._record(r, w, path, rns, wns)
        return f"{where}unknown type {rk!r}"

    def _record(
        self, r: dict[str, Any], w: dict[str, Any], path: str, rns: str | None, wns: str | None
    ) -> str | None:
        written = {f["name"]: f for f in w.get("fields", [])}
        for field in r.get("fields", []):
            name = field["name"]
            sub = f"{path}.{name}" if path else name
            source = written.get(name) or next(
                (written[a] for a in field.get("aliases", []) if a in written), None
            )
            if source is None:
                if "default" not in field:
                    return (
                        f"field {sub!r}: added without a default"
                        " (a reader's field the writer lacks needs one)"
                    )
                continue
            problem = self.match(field["type"], source["type"], sub, rns, wns)
            if problem is not None:
                return problem
        return None


def _same_name(r: dict[str, Any], w: dict[str, Any]) -> bool:
    def short(name: Any) -> str:
        return str(name).rsplit(".", 1)[-1]

    wname = short(w.get("name"))
    return wname == short(r.get("name")) or wname in {short(a) for a in r.get("aliases", [])}


def _show(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        return str(schema.get("type"))
    return str(schema)
