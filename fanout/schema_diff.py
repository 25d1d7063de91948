"""Whether a job's Avro schema is still the one its run was submitted with,
and, if not, its first difference in words. Used by the runner (a job loaded
again mid-run, after an edit: :meth:`fanout.phases.RunInfo.schema_drift`) and
by a table's schema contract (:mod:`fanout.tables.contract`)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["same_schema", "schema_change"]


def same_schema(a: Any, b: Any) -> bool:
    """Whether two schemas (or parts of one) are the same JSON, key order aside."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def schema_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first difference between two record schemas, for people."""
    before = {f["name"]: f for f in old.get("fields", [])}
    after = {f["name"]: f for f in new.get("fields", [])}
    for name in after:
        if name not in before:
            return f"field {name!r} added"
    for name in before:
        if name not in after:
            return f"field {name!r} removed"
    for name, field in after.items():
        if not same_schema(field, before[name]):
            return f"field {name!r} changed"
    return "the schema changed (name, namespace, order or documentation)"
