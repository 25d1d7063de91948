"""Benchmark: RecordWriter vs a plain fastavro.writer call over the same records.

Not a test (pytest does not collect tests/bench). Run it from the repo root:

    python tests/bench/bench_avro.py [--records N] [--codec deflate] [--repeat 5]

It builds N meter_reading records in memory (aware UTC datetimes, like the
meter-readings job emits), then times, in --repeat interleaved rounds:

* plain:        ``fastavro.writer(buf, parsed, records, codec=codec)``
* RecordWriter: ``w.add(r)`` for every record, then ``w.finish()``, its blocks
  compressed in a thread where a core is spare (``fanout.avro_blocks``);
* RecordWriter inline: the same, every block compressed in the writing thread
  (as in a worker pool that takes every core);

and prints the best records/s of each and the ratio RecordWriter / plain (the
target is at least 0.9): from the best times, by wall-clock and CPU time, and
the median of the per-round CPU ratios, the steadiest figure on a busy machine.
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro

from fanout import avro_blocks
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


def timed(fn: Callable[[], bytes]) -> tuple[float, float, bytes]:
    """Wall-clock and CPU seconds of one call (CPU time is steadier on a busy machine)."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--codec", default="deflate")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=None, help="RecordWriter batch_size")
    args = parser.parse_args()

    schema: Schema = load_schema("meter_reading", [REPO / "schemas"])
    records = make_records(args.records)
    codec = args.codec

    def plain() -> bytes:
        buf = io.BytesIO()
        fastavro.writer(buf, schema.parsed, records, codec=codec)
        return buf.getvalue()

    def record_writer() -> bytes:
        writer = (
            RecordWriter(schema, codec=codec)
            if args.batch_size is None
            else RecordWriter(schema, codec=codec, batch_size=args.batch_size)
        )
        add = writer.add
        for record in records:
            add(record)
        return writer.finish()

    def inline() -> bytes:
        avro_blocks.share_cores_with(1_000_000)  # no core spare
        try:
            return record_writer()
        finally:
            avro_blocks.share_cores_with(1)

    # Interleaved rounds (alternating which goes first), so that a noisy
    # machine hurts both about equally: best time of each, and the median of
    # the per-round ratios (each round's two runs are close in time).
    wall = {"plain": float("inf"), "ours": float("inf"), "inline": float("inf")}
    cpu = dict(wall)
    round_ratios = []
    outputs = {}
    runs = [("plain", plain), ("ours", record_writer), ("inline", inline)]
    for i in range(args.repeat):
        this_round = {}
        for name, fn in runs if i % 2 == 0 else runs[::-1]:
            w, c, outputs[name] = timed(fn)
            this_round[name] = c
            wall[name] = min(wall[name], w)
            cpu[name] = min(cpu[name], c)
        round_ratios.append(this_round["plain"] / this_round["ours"])

    n = len(records)
    same = len(list(fastavro.reader(io.BytesIO(outputs["ours"])))) == n
    print(f"records: {n:,}  codec: {codec}  rounds: {args.repeat}")
    threaded = "a thread" if avro_blocks.worth_it(codec) else "inline"
    for label, key in (
        ("plain fastavro.writer", "plain"),
        (f"RecordWriter ({threaded})", "ours"),
        ("RecordWriter (inline)", "inline"),
    ):
        print(
            f"{label:26s} {n / wall[key]:10,.0f} records/s wall ({wall[key]:.2f} s), "
            f"{n / cpu[key]:10,.0f} records/s CPU ({cpu[key]:.2f} s)  [best]"
        )
    print(
        f"ratio RecordWriter / plain: best {wall['plain'] / wall['ours']:.3f} wall, "
        f"{cpu['plain'] / cpu['ours']:.3f} CPU; median of rounds "
        f"{statistics.median(round_ratios):.3f} CPU  (target >= 0.9); "
        f"inline: best {wall['plain'] / wall['inline']:.3f} wall, "
        f"{cpu['plain'] / cpu['inline']:.3f} CPU"
    )
    print(
        f"sizes: plain {len(outputs['plain']):,} bytes, RecordWriter {len(outputs['ours']):,} bytes"
    )
    if not same:
        raise SystemExit("RecordWriter output does not read back as the same number of records")


if __name__ == "__main__":
    main()
