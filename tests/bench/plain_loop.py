"""The csv → fastavro loop a user writes by hand: the ETL benchmarks' baseline.

A module of its own, importing only what that loop needs, so that run as a
script (``bench_etl.py``'s "as a script" figure) it pays interpreter start-up
and ``import fastavro`` as a user's script does, and nothing of the benches'.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

import fastavro


def plain_loop(src: Path, out: Path, schema: dict[str, object], codec: str) -> int:
    """What a user writes by hand: csv → dict → fastavro, one Avro file per CSV,
    the records the example job writes (``source``: the file's path, as the job
    has it from its listing; ``bench_etl.py`` checks they are the same)."""
    parsed = fastavro.parse_schema(schema)
    total = 0
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.csv")):
        records = []
        source = str(path)
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader)
            for line, (meter_id, read_at, kwh) in enumerate(reader, 1):
                value = float(kwh)
                records.append(
                    {
                        "meter_id": meter_id,
                        "read_at": datetime.fromisoformat(read_at),
                        "kwh": value,
                        "adjusted_kwh": value * 1.0 + 0.0,
                        "source": source,
                        "line": line,
                    }
                )
        with (out / (path.stem + ".avro")).open("wb") as f:
            fastavro.writer(f, parsed, records, codec=codec)
        total += len(records)
    return total
