"""Garbage collection: what no committed run and no table's catalog still needs.

What :func:`collect` finds (each with its reason):

- ``uncommitted``: files of an attempt that never committed (a crash, a timeout,
  a lost lease), once its run has finished: a run's Avro file that its manifest
  does not list, a parts list no committed output names, a table file in no
  version of its catalog's live set. A file of a run still running is never
  touched: its committed files join the table only when it finishes.
- ``compaction``: files a finished or long-dead compaction left
  (:func:`fanout.tables.compact.recover`).
- ``payload``: offloaded chunk payloads of a finished run with no dead or
  cancelled chunks (a run with some keeps them for ``fanout replay``, which
  runs the dead ones and those a stop cancelled).
- ``catalog``: catalog versions older than the last :data:`KEEP_VERSIONS`.
- ``old run`` (with ``older_than``): every object under ``runs/<run>/`` of a run
  that finished longer ago, but a note that it did (``keys.collected_key``),
  written before the first delete: ``fanout replay`` and ``fanout cat`` refuse
  such a run by it, where they would rerun its dead chunks into a manifest of
  files no longer there. A table's files are not under ``runs/``: a committed
  file of a table is never removed.

The ledger's records are left as they are (it has no delete API).
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass

from fanout.backends.base import TERMINAL_RUN_STATES, Ledger, RunRecord, Store, TaskState
from fanout.backends.keys import (
    RUNS_PREFIX,
    TABLES_PREFIX,
    collected_key,
    run_of_key,
    table_catalog_key,
    table_prefix,
)
from fanout.backends.rules import replayable
from fanout.tables.catalog import read_catalog, versions
from fanout.tables.compact import recover

__all__ = ["KEEP_VERSIONS", "Garbage", "collect", "parse_age", "table_names"]

#: The reason of the objects of a whole run removed for its age.
OLD_RUN = "old run"
#: Catalog versions kept (readers that listed a little earlier may still read one).
KEEP_VERSIONS = 10
#: A table file written by a chunk attempt: ``<run_id>.<chunk>-s<seq>-a<attempt>-<token8>.avro``.
_ATTEMPT_FILE = re.compile(r"^(?P<run>.+?)\.\d+(?:\.\d+)*-s\d+-a\d+-[0-9a-f]{8}\.avro$")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Garbage:
    """One object gc removes (or would, with ``--dry-run``)."""

    key: str
    reason: str


def parse_age(text: str) -> float:
    """``30m``, ``12h``, ``7d``, ``2w`` as seconds; ``ValueError`` otherwise."""
    match = _AGE.match(text.strip())
    if not match:
        raise ValueError(f"age {text!r}: use a number and s, m, h, d or w (e.g. 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def collect(
    store: Store,
    ledger: Ledger,
    older_than: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> list[Garbage]:
    """Find the garbage and, unless ``dry_run``, delete it; returns it sorted."""
    now = time.time() if now is None else now
    found: list[Garbage] = []
    found += _table_garbage(store, ledger, dry_run)
    found += _run_garbage(store, ledger, older_than, now)
    if not dry_run:
        old = {run_id for g in found if g.reason == OLD_RUN if (run_id := run_of_key(g.key))}
        for run_id in sorted(old):
            note = {"collected_at": now, "older_than": older_than}
            store.put(collected_key(run_id), json.dumps(note).encode())
        for item in found:
            if item.reason != "compaction":  # recover() deleted those already
                store.delete(item.key)
    return sorted(found, key=lambda g: (g.reason, g.key))


class _Runs:
    """Run records, read from the ledger once each."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._cache: dict[str, RunRecord | None] = {}

    def get(self, run_id: str) -> RunRecord | None:
        if run_id not in self._cache:
            self._cache[run_id] = self.ledger.get_run(run_id)
        return self._cache[run_id]

    def finished(self, run_id: str) -> bool:
        run = self.get(run_id)
        return run is not None and run.state in TERMINAL_RUN_STATES


def table_names(store: Store) -> list[str]:
    names = set()
    for key in store.list(TABLES_PREFIX):
        parts = key.split("/")
        if len(parts) > 2 and parts[2] == "_catalog":
            names.add(parts[1])
    return sorted(names)


def _table_garbage(store: Store, ledger: Ledger, dry_run: bool) -> list[Garbage]:
    out: list[Garbage] = []
    for table in table_names(store):
        out += [Garbage(k, "compaction") for k in recover(store, table, dry_run=dry_run)]
        # The order is what makes this safe: the files, then their runs' states,
        # then the catalog. A run joins its table before it is marked finished,
        # so a run read as finished here has its files in the catalog read after
        # it. Read the other way round, a run that joined and finished between
        # the two reads had its committed files taken for an attempt's leftovers
        # and deleted. The runs are read afresh for each table, after its listing:
        # a state read earlier may predate a replay that reopened the run.
        runs = _Runs(ledger)
        candidates = []
        for key in store.list(table_prefix(table)):
            rest = key[len(table_prefix(table)) :]
            if any(seg.startswith("_") for seg in rest.split("/")[:-1]):
                continue  # the table's own metadata
            match = _ATTEMPT_FILE.match(rest.rsplit("/", 1)[-1])
            if match is not None and runs.finished(match.group("run")):
                candidates.append(key)
        pending = _pending_compaction_files(store, table)
        catalog = read_catalog(store, table)
        if catalog is None:
            continue
        kept = {f["key"] for f in catalog.files} | pending
        out += [Garbage(k, "uncommitted") for k in candidates if k not in kept]
        for version in versions(store, table)[:-KEEP_VERSIONS]:
            out.append(Garbage(table_catalog_key(table, version), "catalog"))
    return out


def _pending_compaction_files(store: Store, table: str) -> set[str]:
    """Files named by compaction intents still present: recover() decides about
    those (an intent it leaves belongs to a compaction that may still be running)."""
    keys: set[str] = set()
    for ikey in store.list(f"{table_prefix(table)}_compactions/"):
        try:
            intent = json.loads(store.get(ikey))
        except KeyError:
            continue
        for group in intent["groups"]:
            keys.update(group["old"])
            keys.add(group["new"])
    return keys


def _run_garbage(
    store: Store, ledger: Ledger, older_than: float | None, now: float
) -> list[Garbage]:
    by_run: dict[str, list[str]] = defaultdict(list)
    for key in store.list(RUNS_PREFIX):
        run_id = run_of_key(key)
        if run_id is not None:
            by_run[run_id].append(key)
    # Read after the listing (as for tables above): a file of a replay that
    # reopened a run is only listed with the run read as running.
    runs = _Runs(ledger)
    out: list[Garbage] = []
    for run_id, keys in sorted(by_run.items()):
        run = runs.get(run_id)
        if run is None or run.state not in TERMINAL_RUN_STATES:
            continue  # running (or unknown to this ledger): nothing is garbage yet
        if older_than is not None and (run.finished_at or now) < now - older_than:
            out += [Garbage(k, OLD_RUN) for k in keys if k != collected_key(run_id)]
            continue
        committed = {
            t.output.key
            for t in runs.ledger.list_tasks(run_id, (TaskState.DONE,))
            if t.output is not None
        }
        kept = replayable(run.tasks_dead, run.tasks_cancelled)
        for key in keys:
            kind = key.split("/")[2]
            if kind in ("data", "parts") and key not in committed:
                out.append(Garbage(key, "uncommitted"))
            elif kind == "payloads" and not kept:
                out.append(Garbage(key, "payload"))
    return out
