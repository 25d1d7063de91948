"""Benchmark: RecordWriter vs a plain fastavro.writer call over the same records.

Not a test (pytest does not collect tests/bench). Run it from the repo root:

    python tests/bench/bench_avro.py [--records N] [--codec deflate] [--repeat 3]

It builds N meter_reading records in memory (aware UTC datetimes, like the
meter-readings job emits), then times, best of --repeat runs each:

* plain:        ``fastavro.writer(buf, parsed, records, codec=codec)``
* RecordWriter: ``w.add(r)`` for every record, then ``w.finish()``

and prints records/s for both and the ratio (RecordWriter / plain; the target is
at least 0.9).
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro

from fanout.avro import RecordWriter, Schema, load_schema

REPO = Path(__file__).resolve().parents[2]


def make_records(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """n meter_reading records: 50 meters, a reading every 15 minutes."""
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    records = []
    for i in range(n):
        kwh = round(rng.uniform(0.02, 1.8), 3)
        records.append(
            {
                "meter_id": f"M{i % 50 + 1:04d}",
                "read_at": start + timedelta(minutes=15 * (i // 50)),
                "kwh": kwh,
                "adjusted_kwh": kwh * 1.02 + 0.1,
                "source": f"readings-{i // 200_000:02d}.csv",
                "line": i % 200_000 + 1,
            }
        )
    return records


def best_of(repeat: int, fn: Callable[[], bytes]) -> tuple[float, bytes]:
    best = float("inf")
    out = b""
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--codec", default="deflate")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    schema: Schema = load_schema("meter_reading", [REPO / "schemas"])
    records = make_records(args.records)
    codec = args.codec

    def plain() -> bytes:
        buf = io.BytesIO()
        fastavro.writer(buf, schema.parsed, records, codec=codec)
        return buf.getvalue()

    def record_writer() -> bytes:
        writer = RecordWriter(schema, codec=codec)
        add = writer.add
        for record in records:
            add(record)
        return writer.finish()

    # Interleave so that a noisy machine hurts both about equally.
    t_plain, out_plain = best_of(1, plain)
    t_ours, out_ours = best_of(1, record_writer)
    for _ in range(args.repeat - 1):
        t_plain = min(t_plain, best_of(1, plain)[0])
        t_ours = min(t_ours, best_of(1, record_writer)[0])

    n = len(records)
    same = len(list(fastavro.reader(io.BytesIO(out_ours)))) == n
    print(f"records: {n:,}  codec: {codec}  best of {args.repeat}")
    print(f"plain fastavro.writer: {n / t_plain:12,.0f} records/s  ({t_plain:.2f} s)")
    print(f"RecordWriter:          {n / t_ours:12,.0f} records/s  ({t_ours:.2f} s)")
    print(f"ratio RecordWriter / plain: {t_plain / t_ours:.3f}  (target >= 0.9)")
    print(f"sizes: plain {len(out_plain):,} bytes, RecordWriter {len(out_ours):,} bytes")
    if not same:
        raise SystemExit("RecordWriter output does not read back as the same number of records")


if __name__ == "__main__":
    main()
