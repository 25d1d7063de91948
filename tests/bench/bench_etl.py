"""Benchmark: the meter-readings ETL through the CLI, start-up included, against
the csv → fastavro loop a user would write by hand (issue 11's target: at least
0.9 of the loop's rate on 300,000 rows).

    python tests/bench/bench_etl.py [--rows 300000] [--files 20] [--repeat 5] [--workers 1]
                                    [--per-chunk] [--startup]

Each round, interleaved so that a busy spell of the machine hits both alike:

* plain, in this process: ``plain_loop.plain_loop`` (csv.reader → dict →
  ``fastavro.writer``, one Avro file per CSV, same schema and codec);
* plain, as a script: the same loop in a fresh interpreter (``python -c``),
  so it pays interpreter start-up and ``import fastavro`` as a user's script does;
* ``fanout run jobs/meter_readings.py -p source=... -w N --json``: a fresh
  ``python -m fanout.cli`` to completion, CLI start-up, planning, the chunks,
  finalizing and the manifest included.

It prints the medians and the ratios fanout / plain by wall clock and by CPU
time (the CPU time of the child processes, workers included: steadier on a
loaded machine). The target is the ratio against the in-process loop, the
stricter of the two. ``--per-chunk`` adds what the chunks cost without the CLI:
one file through the loop against one chunk handed to fanout's dispatcher in
this process, interleaved. ``--startup`` adds what start-up is made of (the
interpreter, the loop's imports, the example job's imports, the CLI's), each in a
fresh interpreter. Not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ceiling import ceiling_line  # noqa: E402
from plain_loop import plain_loop  # noqa: E402

from support.make_readings import write_readings  # noqa: E402

JOB = str(ROOT / "jobs" / "meter_readings.py")
SCHEMA = ROOT / "schemas" / "meter_reading.avsc"

#: The plain loop as a user's script: a fresh interpreter, its own imports.
SCRIPT = """\
import json, sys
sys.path.insert(0, sys.argv[1])
from plain_loop import plain_loop
from pathlib import Path
schema = json.loads(Path(sys.argv[2]).read_text())
print(plain_loop(Path(sys.argv[3]), Path(sys.argv[4]), schema, "deflate"))
"""


def children_cpu() -> float:
    """CPU seconds of the waited-for child processes (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_env(pycache: Path) -> dict[str, str]:
    """The children's environment: this checkout's ``fanout``, and byte-code
    cached (in ``pycache``, after a warm-up round), as a pip install has it, even
    where PYTHONDONTWRITEBYTECODE is set: otherwise fanout's own modules would
    be compiled at every start while fastavro's are not."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``cmd`` to completion: (wall seconds, CPU seconds, stdout)."""
    cpu, wall = children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return time.perf_counter() - wall, children_cpu() - cpu, out


def same_records(plain_out: Path, home: Path, rows: int) -> None:
    """Both sides wrote the same records (fanout's, from its run's committed
    files): a loop that wrote less would be a kinder baseline."""
    import fastavro

    def records(files: list[Path]) -> list[tuple[object, ...]]:
        found = []
        for path in files:
            with path.open("rb") as f:
                found += [tuple(r.values()) for r in fastavro.reader(f)]
        return sorted(found, key=lambda r: (str(r[4]), r[5]))

    plain = records(sorted(plain_out.glob("*.avro")))
    (manifest,) = home.glob("store/runs/*/_manifest.json")  # the committed files only
    files = json.loads(manifest.read_text())["files"]
    ours = records([home / "store" / f["key"] for f in files])
    assert len(plain) == len(ours) == rows and plain == ours, "the loop and the job differ"


def per_chunk(src: Path, tmp: Path, rounds: int) -> tuple[float, float]:
    """The job's chunks against the loop without the CLI: median seconds of one
    file through ``plain_loop`` and of one chunk of the same size handed to
    fanout's dispatcher in this process (local backend), interleaved."""
    from fanout import coordinator
    from fanout.backends import open_backend
    from fanout.dispatch import Dispatcher

    schema = json.loads(SCHEMA.read_text())
    one = tmp / "one-file"
    one.mkdir()
    first = sorted(src.glob("*.csv"))[0]
    (one / first.name).write_bytes(first.read_bytes())
    backend = open_backend("local", home=tmp / "home-in-process")
    coordinator.submit(backend, JOB, {"source": str(src)})
    dispatcher = Dispatcher(backend)
    dispatcher.handle(backend.queue.receive(1, 600)[0], 600)  # the plan
    chunks = backend.queue.receive(rounds, 600)
    plain, fanout = [], []
    for i, delivery in enumerate(chunks):
        start = time.perf_counter()
        plain_loop(one, tmp / f"one-out-{i}", schema, "deflate")
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        dispatcher.handle(delivery, 600)
        fanout.append(time.perf_counter() - start)
    return statistics.median(plain), statistics.median(fanout)


#: What start-up is made of, each a fresh interpreter run to completion: the
#: floor any script pays, the loop's imports, the example job's own imports
#: (its pydantic ``Params`` model: pydantic, its plugin scan, the model's
#: build), and the CLI with everything ``fanout run`` imports before a chunk.
STARTUP = {
    "interpreter (python -c pass)": "pass",
    "the loop's imports (fastavro, csv)": "import csv, fastavro",
    "the job's imports (pydantic Params, fanout.Job)": (
        "import runpy, sys; runpy.run_path(sys.argv[1])"
    ),
    "the CLI, all `fanout run` imports": (
        "import fastavro, fanout.cli, fanout.coordinator, fanout.worker, fanout.dispatch"
    ),
}


def startup(env: dict[str, str], rounds: int) -> dict[str, float]:
    """Median wall seconds of each :data:`STARTUP` snippet, interleaved."""
    times: dict[str, list[float]] = {name: [] for name in STARTUP}
    for _ in range(rounds):
        for name, code in STARTUP.items():
            times[name].append(timed_child([sys.executable, "-c", code, JOB], env)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--startup",
        action="store_true",
        help="also time what start-up is made of: the interpreter, the job's imports, the CLI",
    )
    parser.add_argument(
        "--per-chunk",
        action="store_true",
        help="also time one chunk in process against the loop on one file (no CLI)",
    )
    args = parser.parse_args()
    schema = json.loads(SCHEMA.read_text())
    with tempfile.TemporaryDirectory(prefix="bench-etl-") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "csv"
        write_readings(src, files=args.files, rows_per_file=args.rows // args.files)
        rows = (args.rows // args.files) * args.files
        env = child_env(tmp / "pycache")
        figures: dict[str, list[tuple[float, float]]] = {"plain": [], "script": [], "fanout": []}
        phases: list[tuple[float, float, float]] = []
        for i in range(-1, args.repeat):  # round -1 warms the byte-code cache up
            cpu, wall = time.process_time(), time.perf_counter()
            assert plain_loop(src, tmp / f"plain-{i}", schema, "deflate") == rows
            figures["plain"].append((time.perf_counter() - wall, time.process_time() - cpu))

            script = [sys.executable, "-c", SCRIPT, str(HERE), str(SCHEMA), str(src)]
            w, c, out = timed_child([*script, str(tmp / f"script-{i}")], env)
            assert int(out) == rows, out
            figures["script"].append((w, c))

            cli = [sys.executable, "-m", "fanout.cli", "--home", str(tmp / f"home-{i}"), "run"]
            began = time.time()
            w, c, out = timed_child(
                [*cli, JOB, "-p", f"source={src}", "-w", str(args.workers), "--json"], env
            )
            status = json.loads(out.strip().splitlines()[-1])
            assert status["state"] == "succeeded" and status["records"] == rows, status
            figures["fanout"].append((w, c))
            # Where fanout's wall time went, by the run's own timestamps: before
            # the run exists (start-up, loading the job), the run (plan, chunks,
            # finalizing), and after it ended (the CLI's exit).
            ended = began + w
            phases.append(
                (
                    status["created_at"] - began,
                    status["finished_at"] - status["created_at"],
                    ended - status["finished_at"],
                )
            )
            if i < 0:
                figures = {name: [] for name in figures}
                phases = []
                same_records(tmp / f"plain-{i}", tmp / f"home-{i}", rows)
        chunk_figures = per_chunk(src, tmp, min(8, args.files)) if args.per_chunk else None
        startup_figures = startup(env, 3 * args.repeat) if args.startup else None

    def median(name: str, index: int) -> float:
        return statistics.median(f[index] for f in figures[name])

    print(
        f"meter-readings ETL, {rows:,} rows in {args.files} CSV files, codec deflate,"
        f" median of {args.repeat} interleaved rounds"
    )
    workers = f"{args.workers} worker{'s' if args.workers > 1 else ''}"
    for name, what in (
        ("plain", "plain loop, in process"),
        ("script", "plain loop, as a script"),
        ("fanout", f"fanout run, {workers}, CLI start-up included"),
    ):
        wall, cpu = median(name, 0), median(name, 1)
        print(f"  {what:<48} {rows / wall:>9,.0f} rows/s  wall {wall:6.2f}s  CPU {cpu:6.2f}s")
    for base in ("plain", "script"):
        wall = median(base, 0) / median("fanout", 0)
        cpu = median(base, 1) / median("fanout", 1)
        target = "   (target >= 0.9)" if base == "plain" else ""
        print(f"  fanout / {base:<7} by wall {wall:.2f}, by CPU {cpu:.2f}{target}")
    before, during, after = (statistics.median(p[k] for p in phases) for k in range(3))
    print(
        f"  fanout's wall time: {before:.3f}s before the run exists (start-up, the job"
        f" loaded), {during:.3f}s the run, {after:.3f}s exit"
    )
    # The best the target allows for: chunks that cost exactly the loop's time,
    # after the same start-up and exit.
    loop = median("plain", 0)
    print(
        f"  with the run as fast as the loop itself, the ratio would be"
        f" {loop / (loop + before + after):.2f}"
    )
    if chunk_figures is not None:
        plain_s, chunk_s = chunk_figures
        print(
            f"  one file in process, no CLI: loop {plain_s:.3f}s, fanout chunk {chunk_s:.3f}s"
            f" (median of {min(8, args.files)}): ratio {plain_s / chunk_s:.2f}"
        )
    if startup_figures is not None:
        print(f"  start-up, median of {3 * args.repeat} fresh interpreters each:")
        for name, seconds in startup_figures.items():
            print(f"    {name:<50} {1000 * seconds:6.1f} ms")
    if args.workers > 1:
        print(f"  {ceiling_line(args.workers)}")


if __name__ == "__main__":
    main()
