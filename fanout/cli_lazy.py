"""The commands ``fanout`` imports only when they are invoked, with the help
line ``fanout --help`` lists them by, so that it imports none of them."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import click


class Lazy(NamedTuple):
    """A command defined in another module: its loader, its name there, and its
    help line (tests/test_coldstart.py checks it is the command's own)."""

    load: Callable[[], ModuleType]
    attr: str
    help: str

    def command(self) -> click.Command:
        """The command, its module imported."""
        command = getattr(self.load(), self.attr)
        assert isinstance(command, click.Command), self.attr
        return command

    def short_help(self, limit: int) -> str:
        """The help line cut to ``limit`` characters, as click cuts a command's."""
        return click.Command(self.attr, help=self.help).get_short_help_str(limit)


def _observe() -> ModuleType:
    from fanout import cli_observe

    return cli_observe


def _aws() -> ModuleType:
    from fanout import cli_aws

    return cli_aws


def _schedules() -> ModuleType:
    from fanout import cli_schedule

    return cli_schedule


def _ui() -> ModuleType:
    from fanout import cli_ui

    return cli_ui


def _tables() -> ModuleType:
    from fanout import cli_tables

    return cli_tables


#: Commands defined in other modules (none of which imports this one), each
#: imported when it is invoked: every command starts this interpreter, and
#: ``fanout run`` need not import the dashboard, the schedules (croniter,
#: pydantic), the table tools or the AWS commands (issue 11: CLI start-up is
#: part of what a user waits for; tests/test_coldstart.py). Command name: (the
#: loader of its module, the command's name there, its help line for
#: ``fanout --help``, which so imports none of them; tests/test_coldstart.py checks
#: each line is the command's own).
LAZY_COMMANDS: dict[str, Lazy] = {
    "runs": Lazy(_observe, "runs", "Recent runs, newest first."),
    "failed": Lazy(
        _observe, "failed", "Dead chunks of RUN, with their errors and attempt history."
    ),
    "logs": Lazy(
        _observe,
        "logs",
        "RUN's chunk events, oldest first: time, chunk, seq, attempt, outcome, details.",
    ),
    "cost": Lazy(
        _observe,
        "cost",
        "Estimate what RUN would cost on AWS, from its own measured figures.",
    ),
    "dead-letters": Lazy(
        _observe,
        "dead_letters",
        "Messages that were dropped or failed every delivery, with the reason (a dead"
        " *chunk* is listed by ``fanout failed RUN`` instead).",
    ),
    "aws": Lazy(_aws, "aws", "Create or remove a stage's resources without CloudFormation."),
    "deploy": Lazy(
        _aws,
        "deploy",
        "Package the code and its dependency layer; create or update the AWS stack of STAGE.",
    ),
    "schedule": Lazy(
        _schedules,
        "schedule",
        "Cron schedules: submit a job at the ticks of a cron or rate expression.",
    ),
    "scheduler": Lazy(
        _schedules,
        "scheduler",
        "Submit the runs of due schedule ticks, until Ctrl-C / SIGTERM.",
    ),
    "ui": Lazy(_ui, "ui", "Serve the web dashboard of this backend's runs and print its URL."),
    "report": Lazy(
        _ui,
        "report",
        "Write RUN's page as one self-contained HTML file (no network needed to open it).",
    ),
    "tables": Lazy(
        _tables,
        "tables",
        "The tables in the store: partitions, files, records, schema version.",
    ),
    "schema": Lazy(
        _tables,
        "schema",
        "The schema history of TABLE, oldest first (the last not pending is current).",
    ),
    "read": Lazy(
        _tables,
        "read",
        "The records of TABLE as JSON lines, read through its catalog (each once).",
    ),
    "compact": Lazy(
        _tables,
        "compact",
        "Merge TABLE's small committed files into files near the target size (crash-safe).",
    ),
    "gc": Lazy(
        _tables,
        "gc",
        "Remove uncommitted attempt files, finished runs' payloads, old catalog versions"
        " and (with --older-than) old runs; never a committed table file.",
    ),
    "catalog": Lazy(
        _tables,
        "catalog",
        "Create or update TABLE in the AWS Glue catalog (Avro SerDe, partition projection),"
        " so Athena can query it.",
    ),
}
