"""The Lambda handler's import stays light: what only some invocations need is
imported (or built) when one needs it. Not a timing test (those are in
tests/bench/bench_coldstart.py); this one fails when a module-level import or an
eagerly built model creeps back in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]

#: Imports the handler as Lambda's init does, then reports what it loaded.
PROBE = """\
import json, sys
import fanout.aws_lambda
print(json.dumps(sorted(sys.modules)))
"""

#: Needed by some invocations only, or by none: crawl jobs (Scrapy, Twisted),
#: jobs with a schema (fastavro), the AWS backend and its boto3 (built on the
#: first invocation), schedules (croniter), submitting runs, deploying, the CLI;
#: and pydantic, which only jobs that use it import (params models, run
#: settings set in the job; issue 11): the handler reads chunk messages and a
#: run's recorded limits without it.
LAZY = (
    "scrapy",
    "twisted",
    "fastavro",
    "boto3",
    "botocore",
    "croniter",
    "yaml",
    "click",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "fanout.avro",
    "fanout.crawl",
    "fanout.coordinator",
    "fanout.backends.aws",
    "fanout.schedules",
    "fanout.deploy",
    "fanout.settings",
)


def early(loaded: set[str]) -> list[str]:
    """The modules of :data:`LAZY` (and their submodules) in ``loaded``."""
    return sorted(m for m in loaded for lazy in LAZY if m == lazy or m.startswith(lazy + "."))


def test_handler_import_leaves_the_rest_for_later() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert "fanout.runner" in loaded  # the probe did import the handler's code
    assert early(loaded) == []


#: A job as a user writes one without pydantic: no params model, no settings.
PLAIN_JOB = """\
from fanout import Job

job = Job("plain")


@job.plan
def plan(params, ctx):
    yield {"n": 1}
    yield {"n": 2}


@job.process
def process(chunk, ctx):
    return None
"""

#: Init as on Lambda, then what its first invocations do: the run's plan and a
#: first chunk, through the handler's dispatcher (on the local backend: the
#: AWS one would bring boto3 in, which this test is not about).
FIRST_CHUNK = """\
import json, sys
import fanout.aws_lambda
from fanout.backends import open_backend
from fanout.dispatch import Dispatcher
backend = open_backend("local", home=sys.argv[1])
dispatcher = Dispatcher(backend, fanout.aws_lambda._PackagedRunner(backend))
outcomes = []
for _ in range(2):
    (delivery,) = backend.queue.receive(1, 30)
    outcomes.append(str(dispatcher.handle(delivery, 30)))
print(json.dumps({"outcomes": outcomes, "modules": sorted(sys.modules)}))
"""


def test_the_first_chunk_of_a_job_without_pydantic_needs_no_pydantic(tmp_path: Path) -> None:
    """Moving pydantic from the handler's init into its first invocation would
    win nothing (Lambda bills init, and a user waits for init and the first
    chunk): the chunk message and the run's limits are read without it."""
    from fanout import coordinator
    from fanout.backends import open_backend

    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "plain.py"  # under jobs/: the packaged runner's rule
    job.write_text(PLAIN_JOB)
    backend = open_backend("local", home=tmp_path / "home")
    try:
        coordinator.submit(backend, str(job), {}, {"max_attempts": 2})
    finally:
        backend.close()
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CHUNK, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the job must lie under the task root's jobs/ (fanout.packaged)
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "LAMBDA_TASK_ROOT": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["outcomes"] == ["committed", "committed"]  # the plan, then a chunk
    loaded = set(report["modules"])
    assert "fanout.jobs" in loaded and any(m.startswith("fanout_job_") for m in loaded)
    assert early(loaded) == []


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


#: ``fanout [COMMAND] --help`` (``fanout run --help`` parses the command line as
#: ``fanout run JOB`` does before it submits); then reports what the CLI imported.
HELP_PROBE = """\
import json, sys
from fanout.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""

#: What only other commands need: their modules (the dashboard, schedules,
#: tables, AWS and observation commands) and the packages they bring.
NOT_FOR_RUN = (
    "fanout.cli_observe",
    "fanout.cli_aws",
    "fanout.cli_schedule",
    "fanout.cli_ui",
    "fanout.cli_tables",
    "fanout.ui",
    "fanout.schedules",
    "fanout.tables.gc",
    "fanout.tables.compact",
    "fastavro",
    "croniter",
    "boto3",
    "botocore",
    "scrapy",
    "twisted",
)


def probe_help(*argv: str) -> tuple[str, set[str]]:
    """``fanout ARGV`` in a fresh interpreter: its help text, and the modules it imported."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    help_text, _, last = done.stdout.rstrip().rpartition("\n")
    return help_text, set(json.loads(last))


def test_fanout_run_imports_no_other_command() -> None:
    help_text, loaded = probe_help("run", "--help")
    assert "Submit JOB and work it to completion" in help_text
    assert "fanout.cli_controls" in loaded  # the probe did import the CLI's own modules
    assert sorted(m for m in loaded for n in NOT_FOR_RUN if m == n or m.startswith(n + ".")) == []


@pytest.mark.parametrize("argv", [["cancel", "--help"], ["pause", "--help"], ["run", "--help"]])
def test_a_command_starts_without_pydantic_unless_it_needs_it(argv: list[str]) -> None:
    """The coordinator, and with it pydantic (~0.1 s), is imported by the
    commands that submit or read runs when they run, not by every command."""
    help_text, loaded = probe_help(*argv)
    assert "Usage: " in help_text
    assert {"pydantic", "fanout.coordinator", "fanout.settings"} & loaded == set()


def test_fanout_help_imports_no_other_command_nor_pydantic() -> None:
    """`fanout --help` lists the other modules' commands by their help lines
    (fanout.cli_lazy), not by importing them: it imported the schedules (and
    pydantic with them), the dashboard, the table tools, ~0.15 s."""
    help_text, loaded = probe_help("--help")
    assert "Cron schedules: submit a job" in help_text  # listed all the same
    assert "fanout.cli_controls" in loaded
    assert sorted(m for m in loaded for n in NOT_FOR_RUN if m == n or m.startswith(n + ".")) == []
    assert {"pydantic", "fanout.coordinator", "fanout.runner"} & loaded == set()


def test_each_lazy_command_s_help_line_is_its_own() -> None:
    from fanout.cli_lazy import LAZY_COMMANDS

    for name, lazy in LAZY_COMMANDS.items():
        command = lazy.command()
        assert command.name == name
        assert lazy.short_help(1000) == command.get_short_help_str(1000), name
        assert lazy.short_help(40) == command.get_short_help_str(40), name


def test_fanout_help_lists_every_command_each_from_its_module() -> None:
    from click.testing import CliRunner

    from fanout import cli_aws, cli_controls, cli_observe, cli_schedule, cli_tables, cli_ui
    from fanout.cli import main

    commands = [
        command
        for module in (cli_aws, cli_controls, cli_observe, cli_schedule, cli_tables, cli_ui)
        for command in vars(module).values()
        if isinstance(command, click.Command)
    ]
    subcommands = {
        sub for group in commands if isinstance(group, click.Group) for sub in group.commands
    }
    defined = {c.name for c in commands if c.name is not None} - subcommands
    assert len(defined) >= 19  # the probe found the commands of those modules
    shown = CliRunner().invoke(main, ["--help"]).output
    listed = shown.split("Commands:", 1)[1].split()
    for name in defined | {"run", "submit", "worker", "status", "validate", "deploy"}:
        assert name in listed, name
        with click.Context(main) as ctx:
            command = main.get_command(ctx, name)
        assert command is not None and command.name == name
