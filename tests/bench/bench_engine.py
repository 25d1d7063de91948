"""Engine benchmarks, each figure a ratio against a baseline measured in the same run.

    python tests/bench/bench_engine.py            # full size (10,000 chunks, 1,000,000 rows)
    python tests/bench/bench_engine.py --quick    # a tenth of that
    python tests/bench/bench_engine.py --quick --verbose   # and where (a)'s time goes

(a) no-op chunk throughput of the local backend with 2 workers, end to end
    (submit → plan → every chunk claimed, run and committed → manifest), against
    the 3,000 chunks/s target and against a bare multiprocessing pool doing
    nothing per task (the floor of "Python processes passing messages").
(b) the meter-readings ETL over 1,000,000 CSV rows with 1 and 2 workers, against
    the loop a user would write by hand: csv.reader → dict → fastavro.writer,
    same rows, same schema, same codec.

With ``--verbose``, one more no-op run under py-spy (sampling the CLI and its
worker processes) prints a profile summary: the worker processes' time by
function (inclusive) and by line of fanout (exclusive), as shares of it.

Not a test: CI does not run it (machines are noisy; compare within one run).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ceiling import ceiling_line  # noqa: E402
from plain_loop import plain_loop  # noqa: E402

from support.make_readings import write_readings  # noqa: E402

NOOP_JOB = """
from pydantic import BaseModel
from fanout import Job

class Params(BaseModel):
    chunks: int = 1000

job = Job("noop", params=Params)

@job.plan
def plan(params, ctx):
    for i in range(params.chunks):
        yield {"i": i}

@job.process
def process(chunk, ctx):
    return None
"""


def fanout_run(home: Path, job: str, *args: str) -> tuple[float, dict[str, object]]:
    """``fanout run ... --json`` as a user runs it; (wall seconds, final status).
    This checkout's fanout, not an installed one (an A/B from a worktree timed
    the installed code on both sides)."""
    cmd = [sys.executable, "-m", "fanout.cli", "--home", str(home), "run", job, "--json", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    wall = time.perf_counter() - start
    status: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    assert status["state"] == "succeeded", status
    return wall, status


def _noop(_: int) -> None:
    return None


def bench_noop(tmp: Path, chunks: int) -> None:
    job = tmp / "noop.py"
    job.write_text(NOOP_JOB)
    # Baseline: the same number of no-op tasks through a 2-process pool.
    start = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_noop, range(chunks), chunksize=1)
    pool_rate = chunks / (time.perf_counter() - start)

    # The median of three runs: one noisy moment on a shared machine is not the figure.
    runs = []
    for i in range(3):
        wall, status = fanout_run(
            tmp / f"home-noop-{i}", str(job), "-p", f"chunks={chunks}", "-w", "2"
        )
        runs.append((float(status["elapsed_s"]), wall))  # type: ignore[arg-type]
    runs.sort()
    elapsed, wall = runs[1]
    rate = (chunks + 1) / elapsed
    print(f"(a) no-op chunks, local backend, 2 workers, {chunks:,} chunks (median of 3 runs)")
    print(
        f"    fanout: {rate:,.0f} chunks/s (run {elapsed:.2f}s; {wall:.2f}s with CLI start/stop;"
        f" all runs {', '.join(f'{(chunks + 1) / e:,.0f}' for e, _ in runs)})"
    )
    print(f"    target 3,000 chunks/s: ratio {rate / 3000:.2f}")
    print(
        f"    multiprocessing.Pool(2).map of no-ops (chunksize=1): {pool_rate:,.0f} tasks/s,"
        f" fanout/pool = {rate / pool_rate:.2f}"
    )
    print(f"    {ceiling_line()}")


def profile_noop(tmp: Path, chunks: int, top: int = 25) -> None:
    """One more no-op run, sampled by py-spy; prints where the workers' time goes."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("    (no profile: py-spy is not installed; pip install py-spy)")
        return
    job = tmp / "noop.py"
    raw = tmp / "profile.txt"
    cmd = [sys.executable, "-m", "fanout.cli", "--home", str(tmp / "home-noop-profile")]
    cmd += ["run", str(job), "--json", "-p", f"chunks={chunks}", "-w", "2"]
    subprocess.run(
        [spy, "record", "--subprocesses", "-r", "250", "-f", "raw", "-o", str(raw), "--", *cmd],
        check=True,
        capture_output=True,
    )
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # Frames after the last "process ..." frame are one worker child's own.
        starts = [i for i, f in enumerate(frames) if f.startswith("process ")]
        if len(starts) < 2:
            continue  # the supervisor (the CLI process itself)
        frames = frames[starts[-1] + 1 :]
        n = int(count)
        total += n
        for name in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            inclusive[name] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        print("    (no samples from the worker processes)")
        return
    print(f"    profile of the 2 worker processes ({total:,} samples at 250 Hz, py-spy):")
    print("      inclusive, by function:")
    # Leave out the frames every sample passes through (the CLI, the pool, the child's loop).
    shown = [(f, n) for f, n in inclusive.most_common() if "fanout/" in f and n < 0.99 * total]
    for name, n in shown[:top]:
        print(f"      {100 * n / total:5.1f}%  {name}")
    print("      exclusive, by line:")
    for name, n in own.most_common(top // 2):
        print(f"      {100 * n / total:5.1f}%  {name}")


def bench_etl(tmp: Path, rows: int) -> None:
    files = 20
    src = tmp / "csv"
    write_readings(src, files=files, rows_per_file=rows // files)
    schema = json.loads((ROOT / "schemas" / "meter_reading.avsc").read_text())
    job = str(ROOT / "jobs" / "meter_readings.py")

    start = time.perf_counter()
    n = plain_loop(src, tmp / "plain", schema, "deflate")
    plain = time.perf_counter() - start
    print(f"(b) meter-readings ETL, {n:,} rows in {files} CSV files, codec deflate")
    print(f"    plain csv → fastavro loop: {n / plain:,.0f} rows/s ({plain:.2f}s)")
    for workers in (1, 2):
        wall, status = fanout_run(
            tmp / f"home-etl-{workers}", job, "-p", f"source={src}", "-w", str(workers)
        )
        assert status["records"] == n, status
        elapsed = float(status["elapsed_s"])  # type: ignore[arg-type]
        print(
            f"    fanout run, {workers} worker{'s' if workers > 1 else ''}: {n / wall:,.0f} rows/s"
            f" ({wall:.2f}s with CLI start; run {elapsed:.2f}s)"
            f" — ratio to plain {plain / wall:.2f} (run only {plain / elapsed:.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the full size")
    parser.add_argument(
        "--verbose", action="store_true", help="print a profile summary of (a) (needs py-spy)"
    )
    parser.add_argument("--only-noop", action="store_true", help="run (a) only")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    with tempfile.TemporaryDirectory() as tmp:
        bench_noop(Path(tmp), 10_000 // scale)
        if args.verbose:
            profile_noop(Path(tmp), 10_000 // scale)
        if args.only_noop:
            return
        bench_etl(Path(tmp), 1_000_000 // scale)


if __name__ == "__main__":
    main()
