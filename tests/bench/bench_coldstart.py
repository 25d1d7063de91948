"""Benchmark: the Lambda cold start of ``fanout.aws_lambda``, and what the first
invocations cost after it.

Not a test (pytest does not collect tests/bench). Run it from the repo root:

    python tests/bench/bench_coldstart.py [--runs 5] [--no-invoke]

Every figure is the median of ``--runs`` fresh interpreters (subprocesses):

* import: ``import fanout.aws_lambda`` timed inside the process (the issue's
  target: under 150 ms), beside baselines timed the same way in the same run:
  ``import pydantic`` + ``from pydantic import BaseModel`` (issue 11's target:
  the handler at most 1.25 times that, wall and CPU); the same plus
  ``pydantic.fields``, which defining any model imports (with ``pydantic.types``
  and ``annotated_types``), the floor for an import that defines one; and
  ``import boto3``; and the modules the import leaves out (imported later, if at all);
* interpreter: the wall time of ``python -c pass`` and of
  ``python -c "import fanout.aws_lambda"`` (process start included);
* as deployed (unless ``--no-shipped``): ``fanout deploy``'s function zip and
  dependency layer, built for this Python (from PyPI; cached in
  ``~/.cache/fanout/layers``), extracted and imported with ``python -I -S -B``
  (no site-packages, nothing written, as on Lambda's read-only code
  directories), with and without the byte-code ``fanout deploy`` ships when it
  has an interpreter of the runtime's version;
* invocations (unless ``--no-invoke``): a child process imports the handler,
  then handles SQS event-source batches of one record each, against a moto
  server on 127.0.0.1 (so the child imports neither moto nor anything else
  the handler would not), with the environment the stack's template sets: the
  run's plan (the first invocation: boto3 and its clients, the job module,
  pydantic validators, fastavro for the job's schema), then the run's chunks.
  The job is ``jobs/meter_readings.py`` reading its sample CSV files from S3.
  Network round trips to the moto server are in every invocation, warm ones
  too: the difference between the first invocation and a warm one is what a
  cold container pays on top. Printed: init + the first invocation (what
  Lambda bills for a cold start) and init + the plan + a first chunk (what a
  user waits for before the first records exist): moving work out of init
  into the first invocation changes neither.

Byte-code: Lambda's code directories are read-only, so modules without a
``.pyc`` in the zip are compiled at every cold start. The figures here use
whatever this machine does (printed first: with PYTHONDONTWRITEBYTECODE set,
fanout's own modules are compiled at every import, as on Lambda, while
site-packages has pip's ``.pyc`` files, which the layer does not ship).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The tests' moto server (a child process on 127.0.0.1) and SQS event builder.
sys.path.insert(0, str(REPO / "tests"))

from support.lambda_source import sqs_event  # noqa: E402
from support.motoserver import moto_server  # noqa: E402

#: Times ``STATEMENT`` in a fresh interpreter and prints the wall and CPU
#: seconds and which of the heavy packages it imported.
TIMED = """\
import sys, time
t, c = time.perf_counter(), time.process_time()
{statement}
took, cpu = time.perf_counter() - t, time.process_time() - c
heavy = ("pydantic", "boto3", "botocore", "fastavro", "scrapy", "twisted")
print(took, cpu, ",".join(m for m in heavy if m in sys.modules))
"""

#: The Lambda stand-in: imports the handler, then handles one event per stdin line.
CHILD = """\
import json, sys, time
t, c = time.perf_counter(), time.process_time()
import fanout.aws_lambda as function
print(json.dumps({"import": [time.perf_counter() - t, time.process_time() - c]}), flush=True)

class Context:
    def get_remaining_time_in_millis(self):
        return 60_000

for line in sys.stdin:
    t, c = time.perf_counter(), time.process_time()
    result = function.handler(json.loads(line), Context())
    took = [time.perf_counter() - t, time.process_time() - c]
    print(json.dumps({"seconds": took, "result": result}), flush=True)
"""


#: Byte code for the children, cached here (a temporary directory) even where
#: PYTHONDONTWRITEBYTECODE is set: without it fanout's modules were compiled at
#: every import while pydantic's came from site-packages' cache, and the ratio
#: read 1.23 where it is 0.85.
_PYCACHE = tempfile.mkdtemp(prefix="bench-coldstart-pycache-")
atexit.register(shutil.rmtree, _PYCACHE, True)


def bytecode_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (this process's environment) with byte code cached in :data:`_PYCACHE`."""
    env = {**(os.environ if base is None else base), "PYTHONPYCACHEPREFIX": _PYCACHE}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed_statements(statements: list[str], runs: int) -> list[tuple[float, float, str]]:
    """For each statement: median wall and CPU seconds over ``runs`` fresh
    interpreters, and the heavy packages it imported. The statements take turns,
    so that a busy spell of the machine hits them all alike; a first round,
    not counted, writes the byte code."""
    walls: list[list[float]] = [[] for _ in statements]
    cpus: list[list[float]] = [[] for _ in statements]
    heavy = [""] * len(statements)
    for round_ in range(runs + 1):
        for i, statement in enumerate(statements):
            out = subprocess.run(
                [sys.executable, "-c", TIMED.format(statement=statement)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
                env=bytecode_env(),
            ).stdout.split()
            if round_ == 0:
                continue
            walls[i].append(float(out[0]))
            cpus[i].append(float(out[1]))
            heavy[i] = out[2] if len(out) > 2 else ""
    return [
        (statistics.median(w), statistics.median(c), h)
        for w, c, h in zip(walls, cpus, heavy, strict=True)
    ]


def wall(args: list[str], runs: int) -> float:
    """Median wall seconds of running ``python ARGS`` to completion."""
    import time

    times = []
    for round_ in range(runs + 1):  # (round 0 writes the byte code)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, *args], check=True, cwd=REPO, capture_output=True, env=bytecode_env()
        )
        if round_:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


# -- invocations against a moto server -----------------------------------------------


def aws_env(endpoint: str) -> dict[str, str]:
    """Fake credentials and the stack's names, as the template sets them."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FANOUT_STAGE": "bench",
        "FANOUT_AWS_EVENTS_TOPIC": "fanout-bench-run-events",
        "PYDANTIC_DISABLE_PLUGINS": "__all__",  # as deploy/template.yaml sets it
    }


def one_container(backend: Any, child_env: dict[str, str]) -> list[list[float]]:
    """A fresh run worked by one fresh child process, one record per invocation;
    returns [import, invocation 1, invocation 2, ...], each [wall, CPU] seconds
    (the child's own CPU time: steadier than wall time on a busy machine)."""
    from fanout import coordinator

    source = f"s3://{backend.store.bucket}/inputs/readings/"
    run_id = coordinator.submit(
        backend, str(REPO / "jobs" / "meter_readings.py"), {"source": source}
    ).run_id
    sqs, url = backend.queue.sqs, backend.queue.url
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=child_env,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        figures: list[list[float]] = [json.loads(child.stdout.readline())["import"]]
        while backend.ledger.get_run(run_id).state == "running":
            messages = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=30, AttributeNames=["All"]
            ).get("Messages", [])
            if not messages:
                continue
            child.stdin.write(json.dumps(sqs_event(messages)) + "\n")
            child.stdin.flush()
            answer = json.loads(child.stdout.readline())
            figures.append(answer["seconds"])
            failed = {f["itemIdentifier"] for f in answer["result"]["batchItemFailures"]}
            for m in messages:  # what the event source does with the rest
                if m["MessageId"] not in failed:
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert backend.ledger.get_run(run_id).state == "succeeded", run_id
    return figures


#: Imports the handler from an extracted function zip and layer (argv).
SHIPPED = """\
import sys, time
sys.path[:0] = sys.argv[1:3]
t = time.perf_counter()
import fanout.aws_lambda
print(time.perf_counter() - t)
"""


def shipped(runs: int) -> None:
    """Print the handler's import from the deployed zip + layer, with and without
    byte-code, in turns."""
    import platform
    import tempfile
    import zipfile

    from fanout.deploy import build_zip
    from fanout.deploy_layer import LayerSpec, build_layer, layer_requirements

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cpu = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine())
    if sys.platform != "linux" or cpu is None:
        print("  (skipped: Lambda's manylinux wheels only install on Linux x86_64/aarch64)")
        return
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bytecode in (False, True):
            where = Path(tmp) / ("pyc" if bytecode else "src")
            spec = LayerSpec(layer_requirements(crawl=False), version, cpu, bytecode=bytecode)
            try:
                layer = build_layer(spec)
            except Exception as exc:  # no PyPI here
                print(f"  (skipped: the layer did not build: {exc})")
                return
            zipfile.ZipFile(layer).extractall(where / "opt")
            function = build_zip(
                REPO, where / "function.zip", python_version=version if bytecode else None
            )
            zipfile.ZipFile(function).extractall(where / "task")
            variants[bytecode] = [str(where / "task"), str(where / "opt" / "python")]
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(runs):
            for bytecode, paths in variants.items():
                out = subprocess.run(
                    [sys.executable, "-I", "-S", "-B", "-c", SHIPPED, *paths],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times[bytecode].append(float(out.stdout))
    source, compiled = (statistics.median(times[b]) for b in (False, True))
    print(f"  sources only                      {ms(source)}")
    print(f"  with byte-code                    {ms(compiled)}   ratio {compiled / source:.2f}")


def invocations(runs: int) -> None:
    """Print the median import, first invocations and warm invocation."""
    with moto_server() as endpoint:
        env = aws_env(endpoint)
        os.environ.update(env)
        from fanout.backends import open_backend
        from fanout.backends.aws import AwsSettings
        from fanout.backends.aws.resources import create_resources, create_topic

        settings = AwsSettings.from_env()
        create_resources(settings)
        create_topic(settings, "fanout-bench-run-events")
        backend = open_backend("aws")
        readings = REPO / "jobs" / "data" / "readings"
        for path in sorted(readings.glob("*.csv")):
            backend.store.put(f"inputs/readings/{path.name}", path.read_bytes())
        child_env = bytecode_env({**os.environ, **env})
        samples = [one_container(backend, child_env) for _ in range(runs)]
        backend.close()

    def median(index: int, upto: int | None = None) -> str:
        """Wall and CPU medians of figure ``index`` (summed up to ``upto``)."""
        last = index if upto is None else upto
        walls = [sum(s[i][0] for i in range(index, last + 1)) for s in samples]
        cpus = [sum(s[i][1] for i in range(index, last + 1)) for s in samples]
        return f"{ms(statistics.median(walls))} {ms(statistics.median(cpus))}"

    warm = [statistics.median(x[k] for s in samples for x in s[2:]) for k in (0, 1)]
    print("  (wall, CPU)")
    print(f"  import fanout.aws_lambda          {median(0)}")
    print(f"  invocation 1: the run's plan      {median(1)}   (boto3, clients, job, models)")
    print(f"  invocations 2+: its chunks, warm  {ms(warm[0])} {ms(warm[1])}   (800 rows each)")
    print(f"  import + invocation 1             {median(0, 1)}   (init + the plan: both billed)")
    print(f"  import + invocations 1-2          {median(0, 2)}   (init, plan, a first chunk)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per figure")
    parser.add_argument("--no-invoke", action="store_true", help="no invocations")
    parser.add_argument("--no-shipped", action="store_true", help="no zip + layer imports")
    args = parser.parse_args()
    runs = args.runs

    print(f"Python {sys.version.split()[0]}, median of {runs} fresh interpreters")
    import importlib.util

    cached = Path(importlib.util.cache_from_source(str(REPO / "fanout" / "aws_lambda.py")))
    compiled = (
        "yes" if cached.exists() or not sys.dont_write_bytecode else "no: compiled at each import"
    )
    print(f"byte-code of fanout's modules cached: {compiled}")
    print("import, timed inside the process (wall, CPU):")
    statements = [
        "import fanout.aws_lambda",
        "from pydantic import BaseModel",
        "from pydantic import BaseModel; import pydantic.fields",
        "import boto3",
    ]
    timed = timed_statements(statements, runs)
    (target, target_cpu, heavy), (pydantic, pydantic_cpu, _), (fields, fields_cpu, _) = timed[:3]
    boto3, boto3_cpu, _ = timed[3]
    print(
        f"  import fanout.aws_lambda          {ms(target)} {ms(target_cpu)}"
        f"   / target 150 ms: {target / 0.150:.2f}"
    )
    print(
        f"  baseline: pydantic's BaseModel    {ms(pydantic)} {ms(pydantic_cpu)}"
        f"   handler / baseline: {target / pydantic:.2f} (CPU {target_cpu / pydantic_cpu:.2f})"
    )
    print(
        f"  ... and pydantic.fields (a model) {ms(fields)} {ms(fields_cpu)}"
        f"   handler / this: {target / fields:.2f} (CPU {target_cpu / fields_cpu:.2f})"
    )
    print(f"  baseline: import boto3            {ms(boto3)} {ms(boto3_cpu)}")
    print(f"  heavy packages it imports: {heavy or '(none)'}")
    print("whole interpreter, wall time:")
    bare = wall(["-c", "pass"], runs)
    full = wall(["-c", "import fanout.aws_lambda"], runs)
    print(f"  python -c pass                    {ms(bare)}")
    print(f"  python -c 'import fanout.aws_lambda' {ms(full)}   (+{ms(full - bare).strip()})")
    if not args.no_shipped:
        print("as deployed: zip + layer extracted, python -I -S -B (nothing written):")
        shipped(runs)
    if not args.no_invoke:
        print("a cold container, one record per invocation (moto server on 127.0.0.1):")
        invocations(runs)


if __name__ == "__main__":
    main()
