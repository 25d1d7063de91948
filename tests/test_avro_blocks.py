"""Blocks compressed in a thread (fanout.avro_blocks): the file is the one
fastavro alone writes, block for block, whatever the codec, in a forked child
too; and a block the thread fails to compress fails the file."""

from __future__ import annotations

import io
import multiprocessing
import zlib
from typing import Any

import fastavro
import pytest
from avro.datafile import DataFileReader
from avro.io import DatumReader

from fanout import avro_blocks
from fanout.avro import SYNC_INTERVAL, RecordWriter, load_schema

SCHEMA = load_schema(
    {
        "type": "record",
        "name": "row",
        "fields": [{"name": "n", "type": "long"}, {"name": "text", "type": "string"}],
    }
)


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread is chosen by cores and load: each test says its cores, on a
    machine otherwise idle (a test run's own load must not decide)."""
    monkeypatch.setattr(avro_blocks, "_stall", lambda: 0.0)
    monkeypatch.setattr(avro_blocks, "STALL_EVERY", 0.0)  # each writer reads it
    monkeypatch.setattr(avro_blocks, "_load", lambda: 0.0)


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the blocks handed to the compression thread, in order."""
    sizes: list[int] = []
    submit = avro_blocks.ThreadPoolExecutor.submit

    def counting(self: Any, fn: Any, *args: Any) -> Any:
        sizes.append(len(args[1]))
        return submit(self, fn, *args)

    monkeypatch.setattr(avro_blocks.ThreadPoolExecutor, "submit", counting)
    return sizes


def rows(count: int) -> list[dict[str, Any]]:
    # Text that compresses, but not to nothing: blocks of SYNC_INTERVAL bytes each.
    return [{"n": n, "text": f"row {n} " + "xyz" * (n % 50)} for n in range(count)]


def write(records: list[dict[str, Any]], codec: str) -> bytes:
    writer = RecordWriter(SCHEMA, codec)
    for record in records:
        writer.add(record)
    return writer.finish()


def blocks(data: bytes) -> list[tuple[int, int]]:
    """(records, compressed bytes) of each block of an Avro file."""
    return [(b.num_records, b.size) for b in fastavro.block_reader(io.BytesIO(data))]


@pytest.fixture(params=[True, False], ids=["thread", "inline"])
def threaded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(avro_blocks, "_cores", lambda: 2 if request.param else 1)
    return bool(request.param)


@pytest.mark.parametrize("codec", ["deflate", "bzip2", "xz"])
def test_a_threaded_file_is_the_inline_file_block_for_block(
    codec: str, monkeypatch: pytest.MonkeyPatch, submitted: list[int]
) -> None:
    records = rows(20_000)  # ~30 blocks: many more than AHEAD in flight
    monkeypatch.setattr(avro_blocks, "_cores", lambda: 2)
    threaded = write(records, codec)
    monkeypatch.setattr(avro_blocks, "_cores", lambda: 1)
    inline = write(records, codec)
    assert len(submitted) > 3 * avro_blocks.AHEAD  # the thread did compress them
    assert blocks(threaded) == blocks(inline)
    assert len(blocks(threaded)) == len(submitted)
    # Past the header (its sync marker is random), the same bytes but the markers.
    assert len(threaded) == len(inline)
    assert list(fastavro.reader(io.BytesIO(threaded))) == records
    if codec != "xz":  # (which Apache avro does not read)
        with DataFileReader(io.BytesIO(threaded), DatumReader()) as reader:
            assert reader.meta["avro.codec"] == codec.encode()
            assert list(reader) == records


def test_each_file_is_whole_whichever_way_it_was_compressed(threaded: bool) -> None:
    assert write([], "deflate") == b""
    for count in (1, 5_000):
        data = write(rows(count), "deflate")
        assert list(fastavro.reader(io.BytesIO(data))) == rows(count)


def test_big_blocks_stay_in_order(threaded: bool) -> None:
    """Records larger than a block, so each is a block of its own."""
    big = [{"n": n, "text": chr(65 + n % 26) * (3 * SYNC_INTERVAL + n)} for n in range(12)]
    data = write(big, "deflate")
    assert [count for count, _ in blocks(data)] == [1] * 12
    assert list(fastavro.reader(io.BytesIO(data))) == big


def _child(conn: Any) -> None:
    conn.send(write(rows(3_000), "deflate"))
    conn.close()


def test_a_forked_child_compresses_with_a_thread_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent's thread does not exist in a forked worker child: the child
    makes its own, or its first block would wait for ever."""
    monkeypatch.setattr(avro_blocks, "_cores", lambda: 2)
    write(rows(3_000), "deflate")  # the parent's thread, now
    assert avro_blocks._pool is not None
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    try:
        assert parent.poll(60), "the child's file never came"
        data = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    assert list(fastavro.reader(io.BytesIO(data))) == rows(3_000)


def test_a_block_the_thread_cannot_compress_fails_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(avro_blocks, "_cores", lambda: 2)

    def broken(block: bytes, level: int = -1) -> bytes:
        raise MemoryError("no memory for zlib")

    monkeypatch.setattr(zlib, "compress", broken)
    with pytest.raises(MemoryError, match="no memory for zlib"):
        write(rows(5_000), "deflate")


@pytest.mark.parametrize(
    ("cores", "workers", "stall", "load", "thread"),
    [
        (2, 1, 0.0, 0.0, True),
        (2, 2, 0.0, 0.0, False),  # a pool that takes every core
        (4, 3, 0.0, 0.0, True),
        (2, 1, 0.6, 0.0, False),  # tasks were kept waiting for a CPU lately
        (2, 1, 0.4, 0.0, False),  # at the limit
        (2, 1, 0.08, 2.4, True),  # the load average, a minute late, counts this run
        (2, 1, None, 1.4, True),  # no pressure figure: the load average decides
        (2, 1, None, 2.3, False),
    ],
)
def test_a_thread_compresses_only_where_a_core_is_spare(
    cores: int,
    workers: int,
    stall: float | None,
    load: float,
    thread: bool,
    monkeypatch: pytest.MonkeyPatch,
    submitted: list[int],
) -> None:
    """A worker pool's children that take every core compress inline, and so
    does a process on a machine whose cores are all taken: the thread's
    hand-offs would only cost them CPU."""
    monkeypatch.setattr(avro_blocks, "_cores", lambda: cores)
    monkeypatch.setattr(avro_blocks, "_stall", lambda: stall)
    monkeypatch.setattr(avro_blocks, "_load", lambda: load)
    monkeypatch.setattr(avro_blocks, "_sharing", 1)
    avro_blocks.share_cores_with(workers)  # what each worker child does
    records = rows(5_000)
    assert list(fastavro.reader(io.BytesIO(write(records, "deflate")))) == records
    assert bool(submitted) is thread


def test_the_pressure_is_read_once_a_second_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some 40 us a reading: a quick chunk's writer uses the last second's."""
    readings = iter([0.0, 0.9])
    monkeypatch.setattr(avro_blocks, "_stall", lambda: next(readings))
    monkeypatch.setattr(avro_blocks, "STALL_EVERY", 1.0)
    monkeypatch.setattr(avro_blocks, "_stall_read", (-1.0, None))
    now = [1000.0]
    monkeypatch.setattr(avro_blocks, "_clock", lambda: now[0])
    assert [avro_blocks._recent_stall() for _ in range(3)] == [0.0, 0.0, 0.0]
    now[0] += 1.0
    assert avro_blocks._recent_stall() == 0.9


def test_the_pressure_is_read_from_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure comes from /proc/pressure/cpu as Linux writes it (None where
    the file is missing or odd), not from a guess."""
    files = {
        "/proc/pressure/cpu": (
            "some avg10=12.50 avg60=3.10 avg300=0.80 total=1234\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        ),
    }
    monkeypatch.undo()  # the real reader, over these files
    monkeypatch.setattr(avro_blocks, "_read", files.get)
    assert avro_blocks._stall() == pytest.approx(0.125)
    files["/proc/pressure/cpu"] = "some avg10=x"
    assert avro_blocks._stall() is None
    files.clear()
    assert avro_blocks._stall() is None


def test_after_interpreter_shutdown_blocks_are_compressed_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record written from a thread the main thread left behind: the pool
    takes no new work then, and a good record must not become a RecordError."""

    class ShutDown:
        def submit(self, *args: Any) -> None:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(avro_blocks, "_cores", lambda: 2)
    monkeypatch.setattr(avro_blocks, "_executor", ShutDown)
    records = rows(5_000)
    assert list(fastavro.reader(io.BytesIO(write(records, "deflate")))) == records


@pytest.mark.parametrize("thread", [True, False])
def test_a_file_that_failed_to_finish_never_finishes_half_written(
    thread: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk as the file finishes: called again (the disk has room by
    then), finish_file raises again rather than return a file with a block
    written twice."""
    monkeypatch.setattr(avro_blocks, "_cores", lambda: 2 if thread else 1)
    writer = RecordWriter(SCHEMA, "deflate")
    for record in rows(5_000):
        writer.add(record)
    buf = writer._buf
    real = buf.write
    full = [True]

    def write_once_full(data: bytes) -> int:
        if full:
            full.clear()
            raise OSError(28, "No space left on device")
        return real(data)

    monkeypatch.setattr(buf, "write", write_once_full)
    with pytest.raises(OSError, match="No space left"):
        writer.finish_file()
    with pytest.raises(OSError, match="No space left"):
        writer.finish_file()
