"""The object store's keys: where everything lives, and which keys are valid.

The layout, the one place it is spelled out (everything else calls these)::

    runs/<run_id>/data/<chunk>-s<seq>-a<attempt>-<token8>.avro  a chunk's output
    runs/<run_id>/_manifest.json                  the committed files of a finished run
    runs/<run_id>/_collected.json                 what is left of a run `fanout gc` removed
    runs/<run_id>/dead/<chunk>-s<seq>.json        a dead task's message and history
    runs/<run_id>/payloads/<chunk>-s<seq>-<token8>.json  an offloaded payload and cursor
    runs/<run_id>/crawl/robots/<host>.json        a crawl's copy of a site's robots.txt
    dead-letters/<stamp>-<message id>.json        a message that never became a task

``<chunk>`` is the chunk id with ``/`` as ``.`` (``0/3/1`` → ``0.3.1``). Output
keys are attempt-unique, so two attempts of one task never write the same
object: only the ledger's commit makes a file count (docs/architecture.md,
"The commit order"). Offloaded payloads are keyed by the writer's token too:
a late attempt (its lease lost) must not overwrite the payload a child of the
committed attempt refers to.

Validation: keys are S3-style relative paths. They can arrive inside queue
messages, so a store must never let one escape its root (``../``, an absolute
path) or alias another key (``a//b``, ``a/./b``, ``a\\b`` on Windows). Every
store checks keys here so they all accept and reject the same ones.
"""

from __future__ import annotations

import re

#: Where message dead letters are kept (``fanout dead-letters``).
DEAD_LETTERS = "dead-letters/"


def _chunk(chunk_id: str) -> str:
    return chunk_id.replace("/", ".")


#: Every run's keys are under this prefix, each run's under :func:`run_prefix`.
RUNS_PREFIX = "runs/"


def run_prefix(run_id: str) -> str:
    """Everything a run keeps in the store is under this prefix."""
    return f"{RUNS_PREFIX}{run_id}/"


def run_of_key(key: str) -> str | None:
    """The run a key under :data:`RUNS_PREFIX` belongs to (None: no run's key)."""
    if not key.startswith(RUNS_PREFIX):
        return None
    run_id, slash, _ = key[len(RUNS_PREFIX) :].partition("/")
    return run_id if slash and run_id else None


def output_key(run_id: str, chunk_id: str, seq: int, attempt: int, token: str) -> str:
    """Where one attempt writes a chunk's Avro output: unique to the attempt."""
    return f"runs/{run_id}/data/{_chunk(chunk_id)}-s{seq}-a{attempt}-{token[:8]}.avro"


def manifest_key(run_id: str) -> str:
    """Where a finished run's manifest is written."""
    return f"runs/{run_id}/_manifest.json"


def collected_key(run_id: str) -> str:
    """Where ``fanout gc --older-than`` notes that it removed the run's objects:
    the ledger still lists the run's chunks (it has no delete API), so replay
    and ``cat`` must learn from here that their files are gone."""
    return f"runs/{run_id}/_collected.json"


def dead_task_key(run_id: str, chunk_id: str, seq: int) -> str:
    """Where a dead task's message, error and history are kept."""
    return f"runs/{run_id}/dead/{_chunk(chunk_id)}-s{seq}.json"


def payloads_prefix(run_id: str) -> str:
    """Where a run's offloaded payloads are: a message's reference must point here."""
    return f"runs/{run_id}/payloads/"


def payload_key(run_id: str, chunk_id: str, seq: int, token: str) -> str:
    """Where the payload and cursor of a message too big for the queue go;
    ``token`` is the writer's (the attempt that spawned the message, or the
    submit): writers never share a key, so none overwrites what another's
    registered message refers to."""
    return f"{payloads_prefix(run_id)}{_chunk(chunk_id)}-s{seq}-{token[:8]}.json"


def robots_key(run_id: str, netloc: str) -> str:
    """Where a crawl run keeps a site's robots.txt."""
    safe = re.sub(r"[^A-Za-z0-9.\-]", "_", netloc)
    return f"runs/{run_id}/crawl/robots/{safe}.json"


def dead_message_key(stamp: str, message_id: str) -> str:
    """Where the dead letter of a message (``stamp``: the UTC time it was sent,
    or kept where the queue does not say; ``message_id``: made safe for a key
    by the caller) is kept."""
    return f"{DEAD_LETTERS}{stamp}-{message_id}.json"


#: Names starting with this are a store's own in-progress files (see ``DirStore``);
#: a key may not use it, or ``list`` would hide the object.
TEMP_PREFIX = ".tmp-"


def check_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid object key, else raise ``ValueError``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"bad store key {key!r}: must be a non-empty string")
    _check_segments(key, key.split("/"))
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` unchanged if it is a valid listing prefix, else raise ``ValueError``.

    A prefix is a plain string prefix of keys, like S3's (``runs/abc/da`` matches
    ``runs/abc/data/x``), so its last segment may be partial or empty; the
    segments before it must be valid key segments.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"bad store prefix {prefix!r}: must be a string")
    if not prefix:
        return prefix
    segments = prefix.split("/")
    # The last segment may be empty ("runs/") or partial ("runs/ab"), never "..".
    _check_segments(prefix, segments[:-1])
    _check_chars(prefix, segments[-1])
    if segments[-1] in (".", ".."):
        raise ValueError(f"bad store prefix {prefix!r}: '.' and '..' are not allowed")
    return prefix


def _check_segments(key: str, segments: list[str]) -> None:
    for segment in segments:
        if not segment:
            raise ValueError(f"bad store key {key!r}: no leading, trailing or doubled '/' allowed")
        if segment in (".", ".."):
            raise ValueError(f"bad store key {key!r}: '.' and '..' segments are not allowed")
        if segment.startswith(TEMP_PREFIX):
            raise ValueError(f"bad store key {key!r}: names starting {TEMP_PREFIX!r} are reserved")
        _check_chars(key, segment)


def _check_chars(key: str, segment: str) -> None:
    if "\\" in segment:
        raise ValueError(f"bad store key {key!r}: backslashes are not allowed")
    if "\x00" in segment:
        raise ValueError(f"bad store key {key!r}: NUL characters are not allowed")


# -- tables (issue 14: fanout.tables) ----------------------------------------------
# A table's data files sit under ``tables/<table>/<col>=<value>/``, Hive-style, so
# Athena and Spark find its partitions; the table's own metadata sits beside them
# under ``_catalog/`` and ``_compactions/``, names Hive and Athena skip ('_').

TABLES_PREFIX = "tables/"


def table_prefix(table: str) -> str:
    """Everything of one table: data files and metadata (a listing prefix)."""
    return f"{TABLES_PREFIX}{table}/"


def table_catalog_key(table: str, version: int) -> str:
    """Version ``version`` of the table's catalog (written once, never overwritten)."""
    return f"{TABLES_PREFIX}{table}/_catalog/v{version:010d}.json"


def table_catalog_prefix(table: str) -> str:
    """Where the catalog's versions are listed."""
    return f"{TABLES_PREFIX}{table}/_catalog/"


def table_file_key(table: str, partition: str, name: str) -> str:
    """A data file of ``table`` in ``partition`` (``dt=2024-01-01``; "" for none)."""
    middle = f"{partition}/" if partition else ""
    return f"{TABLES_PREFIX}{table}/{middle}{name}"


def compaction_key(table: str, compaction_id: str) -> str:
    """The intent of a compaction in progress: the files it replaces and writes."""
    return f"{TABLES_PREFIX}{table}/_compactions/{compaction_id}.json"


def chunk_parts_key(run_id: str, chunk_id: str, seq: int, attempt: int, token: str) -> str:
    """An attempt of a partitioned chunk: the list of the table files it wrote.
    The ledger commits this key as the attempt's output (attempt-unique, as data
    files are), so only a committed attempt's files ever count."""
    return f"runs/{run_id}/parts/{chunk_id.replace('/', '.')}-s{seq}-a{attempt}-{token[:8]}.json"
