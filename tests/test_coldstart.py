"""The Lambda handler's import stays light: what only some invocations need is
imported (or built) when one needs it. Not a timing test (those are in
tests/bench/bench_coldstart.py); this one fails when a module-level import or an
eagerly built model creeps back in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Imports the handler as Lambda's init does, then reports what it loaded and
#: which pydantic models already have their validators built.
PROBE = """\
import json, sys
import fanout.aws_lambda
from fanout.jobs import RunSettings
from fanout.messages import ChunkMessage, ScheduleFire
models = (RunSettings, ChunkMessage, ScheduleFire)
built = [m.__name__ for m in models if m.__pydantic_complete__]
print(json.dumps({"modules": sorted(sys.modules), "built": built}))
RunSettings()  # deferred, not broken: the first use builds it
print(json.dumps([m.__name__ for m in models if m.__pydantic_complete__]))
"""

#: Needed by some invocations only, or by none: crawl jobs (Scrapy, Twisted),
#: jobs with a schema (fastavro), the AWS backend and its boto3 (built on the
#: first invocation), schedules (croniter), submitting runs, deploying, the CLI.
LAZY = (
    "scrapy",
    "twisted",
    "fastavro",
    "boto3",
    "botocore",
    "croniter",
    "yaml",
    "click",
    "fanout.avro",
    "fanout.crawl",
    "fanout.coordinator",
    "fanout.backends.aws",
    "fanout.schedules",
    "fanout.deploy",
)


def test_handler_import_leaves_the_rest_for_later() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, after = done.stdout.splitlines()
    report = json.loads(first)
    loaded = set(report["modules"])
    assert "fanout.runner" in loaded  # the probe did import the handler's code
    early = sorted(m for m in loaded for lazy in LAZY if m == lazy or m.startswith(lazy + "."))
    assert early == []
    assert report["built"] == []
    assert json.loads(after) == ["RunSettings"]


#: ``fanout run`` (and every other command) imports the CLI and its command
#: modules; what only the schedule commands need waits for them.
CLI_PROBE = """\
import json, sys
import fanout.cli
from fanout.schedules import Schedule
print(json.dumps({"croniter": "croniter" in sys.modules, "built": Schedule.__pydantic_complete__}))
from fanout.schedules import parse_spec
parse_spec("*/5 * * * *")  # the schedule commands still get croniter when they need it
print(json.dumps("croniter" in sys.modules))
"""


def test_cli_import_leaves_croniter_and_the_schedule_model_for_the_schedule_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLI_PROBE], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    first, after = done.stdout.splitlines()
    assert json.loads(first) == {"croniter": False, "built": False}
    assert json.loads(after) is True
