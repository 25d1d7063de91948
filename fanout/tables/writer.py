"""A chunk's records for a table: one Avro file per partition, one parts list.

:class:`PartitionedWriter` stands in for :class:`fanout.avro.RecordWriter` in a
chunk of a table job (:func:`make_writer`). At commit (:meth:`PartitionedWriter.commit`,
called by the runner where it would write its one file) it writes each
partition's file under an attempt-unique name, then a **parts list** naming them,
also at an attempt-unique key, and returns that list as the attempt's
:class:`~fanout.backends.base.Output`. The ledger commits it like any output, so
the commit protocol is today's: files first, then the ledger; the files of an
attempt that never committed are named by no committed parts list.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from fanout.avro import Encoded, OneThread, RecordWriter, Schema, wait_out
from fanout.backends.base import Output, Store, TaskKey
from fanout.backends.keys import chunk_parts_key, table_file_key
from fanout.errors import PermanentError, RecordError
from fanout.tables.commit import PARTS_KIND, PARTS_VERSION
from fanout.tables.spec import TableSpec, field_logical_type, partition_value

if TYPE_CHECKING:
    from fanout.jobs import Job

__all__ = ["PartitionedWriter", "make_writer"]

#: How a RecordWriter's error starts: ``record 12 does not fit schema ...``.
_RECORD_NUMBER = re.compile(r"^record (\d+)")


def make_writer(job: Job, schema: Schema, codec: str) -> RecordWriter:
    """The writer of one chunk of ``job``: a table job's partitions, else one file.

    Typed as a RecordWriter because ChunkContext and the runner take one: a
    PartitionedWriter offers all they use of it (``add``, ``count``, ``size``, ``finish_file``)."""
    spec: TableSpec | None = getattr(job, "table_spec", None)
    if spec is None:
        return RecordWriter(schema, codec=codec)
    return cast(RecordWriter, PartitionedWriter(spec, schema, codec))


class PartitionedWriter:
    """Routes each record to its partition's :class:`RecordWriter`.

    Offers what the runner and ``ChunkContext`` use of a RecordWriter (``add``,
    ``count``, ``size``, ``finish_file``), records from one thread as it takes
    them (:class:`~fanout.avro.OneThread`); ``finish_file`` checks every partition's records
    and returns a short description of the partitions (empty when no record was
    added), and :meth:`commit` writes the files.
    """

    #: What the runner tests (it does not import this module unless a job has a schema).
    partitioned = True

    def __init__(self, spec: TableSpec, schema: Schema, codec: str) -> None:
        self.spec = spec
        self.schema = schema
        self.codec = codec
        self._writers: dict[str, RecordWriter] = {}
        self._count = 0
        logical = field_logical_type(schema.raw, spec.field) if spec.field else None
        self._logical = logical if isinstance(logical, str) else None
        self._files: dict[str, Encoded] | None = None
        #: Per partition, the chunk-wide number of each record it holds.
        self._indices: dict[str, list[int]] = {}
        self._thread = OneThread()
        self._in_add = False
        self._refused: PermanentError | None = None  # a second thread's records

    @contextlib.contextmanager
    def _renumbered(self, partition: str) -> Iterator[None]:
        """A RecordError of a partition's writer numbers the record within that
        partition: say its number within the chunk (and the partition) instead."""
        try:
            yield
        except RecordError as exc:
            match = _RECORD_NUMBER.match(str(exc))
            if match is None or int(match.group(1)) >= len(self._indices[partition]):
                raise
            number = self._indices[partition][int(match.group(1))]
            rest = str(exc)[match.end() :]
            raise RecordError(f"record {number}{rest} (partition {partition})") from exc

    @property
    def count(self) -> int:
        """Records added so far, over every partition."""
        return self._count

    @property
    def size(self) -> int:
        """Bytes of the partitions' files so far."""
        # A copy first: time_left() may be asked from another thread while
        # the emitting one adds a partition.
        return sum(writer.size for writer in list(self._writers.values()))

    def add(self, record: dict[str, Any]) -> None:
        """Add one record to its partition; ``RecordError`` if it has no partition
        value or (as with RecordWriter) does not fit the schema."""
        if self._files is not None:
            raise RuntimeError("PartitionedWriter.add() called after finish()")
        self._in_add = True  # (waited out by finish_file, as in RecordWriter)
        try:
            if threading.get_ident() != self._thread.owner and (refused := self._thread.refusal()):
                self._refused = refused  # (and the chunk fails at its finish, as in RecordWriter)
                raise refused
            partition = partition_value(self.spec, record, self._count, self._logical)
            writer = self._writers.get(partition)
            if writer is None:
                writer = self._writers[partition] = RecordWriter(self.schema, codec=self.codec)
                self._indices[partition] = []
            self._indices[partition].append(self._count)
            with self._renumbered(partition):
                writer.add(record)
            self._count += 1
        finally:
            self._in_add = False

    def finish_file(self) -> Encoded:
        """Finish every partition's file; returns the partitions' names (as
        JSON), empty when nothing was added."""
        self._thread.take()  # a thread the job left running adds no partition now
        wait_out(lambda: self._in_add)
        if self._refused is not None:
            raise self._refused
        if self._files is None:
            files = {}
            for partition, writer in sorted(self._writers.items()):
                with self._renumbered(partition):
                    files[partition] = writer.finish_file()
            self._files = files
        names = json.dumps(sorted(self._files)).encode() if self._count else b""
        return Encoded(io.BytesIO(names), len(names))

    def commit(self, store: Store, key: TaskKey, attempt: int, token: str) -> Output | None:
        """Write the partition files, then the parts list; returns the parts list
        as the attempt's output (None when there is nothing to write). Every name
        carries the attempt's number and token, so attempts never collide."""
        files = self._files if self._files is not None else {}
        stem = f"{key.run_id}.{key.chunk_id.replace('/', '.')}-s{key.seq}-a{attempt}-{token[:8]}"
        entries = []
        for partition, data in files.items():
            if not data:
                continue
            fkey = table_file_key(self.spec.table, partition, f"{stem}.avro")
            store.put(fkey, data.file())
            data.close()
            records = self._writers[partition].count
            entries.append(
                {"key": fkey, "partition": partition, "records": records, "bytes": data.size}
            )
        if not entries:
            return None
        parts = {
            "kind": PARTS_KIND,
            "version": PARTS_VERSION,
            "table": self.spec.table,
            "files": entries,
        }
        pkey = chunk_parts_key(key.run_id, key.chunk_id, key.seq, attempt, token)
        store.put(pkey, json.dumps(parts).encode())
        return Output(pkey, self._count, sum(e["bytes"] for e in entries))  # type: ignore[misc]
