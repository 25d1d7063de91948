"""What the command modules share: the group's backend and ``KEY=VALUE`` parsing.

A module of its own so that :mod:`fanout.cli` and the command modules it
registers (:mod:`fanout.cli_schedule`, :mod:`fanout.cli_observe`) import it
without importing each other (``python -m fanout.cli`` runs ``cli`` as
``__main__``; a command module importing ``fanout.cli`` would load it twice).
"""

from __future__ import annotations

import json
from typing import Any

import click

from fanout.backends import open_backend
from fanout.backends.base import Backend
from fanout.errors import UserError


def group_backend(ctx: click.Context) -> Backend:
    """The backend chosen on the ``fanout`` group (``--backend``, ``--home``),
    opened once per command and closed with it."""
    obj = ctx.ensure_object(dict)
    if "backend" not in obj:
        backend = open_backend(obj["backend_name"], home=obj["home"])
        ctx.call_on_close(backend.close)
        obj["backend"] = backend
    result: Backend = obj["backend"]
    return result


def split_pairs(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` options as a dict. A JSON list or object is taken as such;
    everything else is a string that the job's pydantic model converts (so "2"
    fits an int field)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {pair!r} is not KEY=VALUE")
        if value[:1] in "[{":
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out
