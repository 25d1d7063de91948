"""Generate sample meter-reading CSV files for the meter-readings example job.

The shipped sample (``jobs/data/readings/readings-00.csv`` .. ``readings-04.csv``,
800 rows each) was made with::

    python tests/support/make_readings.py jobs/data/readings --files 5 --rows 800

and the benchmark input (1,000,000 rows) with, e.g.::

    python tests/support/make_readings.py /tmp/readings-1m --files 20 --rows 50000

Each file has the header ``meter_id,read_at,kwh``: 50 meters (``M0001`` ..
``M0050``) read every 15 minutes from 2024-01-01T00:00:00Z, the rows in time
order across files (file k continues where file k-1 stopped), ``kwh`` the energy
used in the 15-minute interval with 3 decimals. Output is deterministic for a
given seed.
"""

from __future__ import annotations

import argparse
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

METERS = 50
INTERVAL = timedelta(minutes=15)
START = datetime(2024, 1, 1, tzinfo=UTC)


def write_readings(directory: Path, files: int, rows_per_file: int, seed: int = 7) -> list[Path]:
    """Write ``files`` CSV files of ``rows_per_file`` readings each into ``directory``.

    Returns the paths written, in order (``readings-00.csv``, ``readings-01.csv``,
    ...; the number is zero-padded to at least 2 digits).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # Each meter has its own base load (kWh per 15 minutes) and evening peak.
    base = [rng.uniform(0.05, 0.35) for _ in range(METERS)]
    peak = [rng.uniform(0.2, 0.9) for _ in range(METERS)]
    width = max(2, len(str(files - 1)))
    paths = []
    row = 0
    for index in range(files):
        path = directory / f"readings-{index:0{width}d}.csv"
        lines = ["meter_id,read_at,kwh"]
        for _ in range(rows_per_file):
            meter = row % METERS
            slot = row // METERS
            when = START + slot * INTERVAL
            hour = when.hour + when.minute / 60
            # A daily curve: low at night, a morning bump, a larger evening peak.
            curve = 0.5 * math.exp(-(((hour - 7.5) / 1.5) ** 2)) + math.exp(
                -(((hour - 19.0) / 2.0) ** 2)
            )
            kwh = base[meter] + peak[meter] * curve + rng.gauss(0.0, 0.03)
            lines.append(
                f"M{meter + 1:04d},{when.strftime('%Y-%m-%dT%H:%M:%SZ')},{max(kwh, 0.0):.3f}"
            )
            row += 1
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write sample meter-reading CSV files.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--rows", type=int, default=800, help="rows per file")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    paths = write_readings(args.directory, args.files, args.rows, args.seed)
    print(f"wrote {len(paths)} files, {len(paths) * args.rows:,} rows, in {args.directory}")


if __name__ == "__main__":
    main()
