"""The schedule commands: ``fanout schedule add|list|show|remove`` and
``fanout scheduler`` (the local loop, or one pass at a given instant with ``--at``).

Registered on the group by :mod:`fanout.cli`; shared helpers come from
:mod:`fanout.cli_common`.
"""

from __future__ import annotations

import json
import re
import signal
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from fanout.cli_common import group_backend, split_pairs
from fanout.errors import UserError
from fanout.jobs import canonical_ref, is_path_ref, load_checked
from fanout.processes import SharedFlag
from fanout.schedules import Schedule, ScheduleStore, check_ranges, open_store, parse_spec
from fanout.schedules.model import NAME_PATTERN, SCHEDULED_TIME, iso, now_utc, parse_time

if TYPE_CHECKING:
    from fanout.schedules.fire import Fired

EXIT_FAILED = 1


def _store(ctx: click.Context) -> ScheduleStore:
    import sqlite3

    from fanout.cli_common import home_problem

    backend = group_backend(ctx)
    try:
        store = open_store(backend)
    except sqlite3.Error as exc:  # a schedules table that is not fanout's
        raise UserError(
            f"{home_problem(ctx.obj['home'], exc)} (its schedules table is not fanout's)"
        ) from None
    ctx.call_on_close(store.close)
    return store


def _job_ref(job: str, backend_name: str) -> str:
    """The job reference a schedule keeps. Locally an absolute path (the scheduler
    may run elsewhere); on AWS a path relative to this directory, the project
    root, which is where the deployed code finds ``jobs/`` too."""
    if backend_name != "aws" or not is_path_ref(job):
        return canonical_ref(job)
    path = Path(job).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        raise UserError(
            f"job {job}: on AWS a job file must be under the project directory"
            " (deployed with its jobs/)"
        ) from None


def _checked_params(job_ref: str, params: dict[str, Any], first: datetime) -> dict[str, Any]:
    """The params as the schedule keeps them, validated now (with a sample
    ``scheduled_time`` when the job takes one) so a typo fails here, not at 3 a.m."""
    if SCHEDULED_TIME in params:
        raise UserError(f"--param {SCHEDULED_TIME} is set by the scheduler to each tick's time")
    from pydantic import BaseModel

    from fanout.schedules.fire import takes_scheduled_time

    # (takes_scheduled_time loads the job: one that does not load is told there)
    sample = {**params, SCHEDULED_TIME: iso(first)} if takes_scheduled_time(job_ref) else params
    _, model = load_checked(job_ref, sample)
    if not isinstance(model, BaseModel):
        return params
    # What the user set, as the model normalized it (a relative path made absolute).
    kept: dict[str, Any] = model.model_dump(mode="json", exclude_unset=True)
    kept.pop(SCHEDULED_TIME, None)
    return kept


@click.group("schedule")
def schedule() -> None:
    """Cron schedules: submit a job at the ticks of a cron or rate expression.

    \b
    Expressions (all UTC):
      "*/5 * * * *"                 standard 5-field cron (and @hourly, @daily, ...)
      "cron(0 12 ? * MON-FRI *)"    AWS cron: min hour day month day-of-week year
      "rate(5 minutes)"             every 5 minutes, counted from the Unix epoch
    """


@schedule.command("add")
@click.argument("name")
@click.option("--cron", "expression", required=True, metavar="EXPR", help="When it fires.")
@click.argument("job")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A job param.")
@click.option(
    "--overlap",
    type=click.Choice(["skip", "allow"]),
    default="allow",
    show_default=True,
    help="skip: no run starts while the previous run of this schedule is still going.",
)
@click.option(
    "--catch-up",
    "catch_up",
    type=click.Choice(["none", "latest", "all"]),
    default="latest",
    show_default=True,
    help="Ticks missed while no scheduler ran: fire none, the latest, or all of them.",
)
@click.option("--start", metavar="ISO-TIME", help="No tick before this fires (default: now).")
@click.pass_context
def add(
    ctx: click.Context,
    name: str,
    expression: str,
    job: str,
    params: tuple[str, ...],
    overlap: str,
    catch_up: str,
    start: str | None,
) -> None:
    """Add schedule NAME: submit JOB at every tick of EXPR."""
    if not _a_name(name):
        raise UserError(
            f"schedule name {name!r}: use at most 64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    spec = parse_spec(expression)
    # Here, not in parse_spec: a stored schedule with such a range (saved by an
    # older fanout) must go on loading and firing; only a new one is refused.
    check_ranges(spec)
    now = now_utc()
    begin = parse_time(start, "--start") if start else now
    first = spec.first_at_or_after(begin)  # start is inclusive
    if first is None:
        raise UserError(f"schedule expression {expression!r} never fires after {iso(begin)}")
    backend_name = ctx.obj["backend_name"]
    ref = _job_ref(job, backend_name)
    if backend_name == "aws":
        spec.aws_expression()  # fail before any AWS call if EventBridge cannot say it
        if ctx.get_parameter_source("catch_up") is ParameterSource.COMMANDLINE:
            raise UserError(
                "--catch-up does not apply on AWS: EventBridge fires every tick itself"
                " (a missed one is not fired later)"
            )
        # EventBridge fires from now on, whatever the start: none in the past.
        first = spec.first_at_or_after(max(begin, now)) or first
    entry = Schedule(
        name=name,
        expression=expression,
        job=ref,
        params=_checked_params(ref, split_pairs(params, "--param"), first),
        overlap=overlap,
        catch_up=catch_up,
        start=begin,
        created_at=now,
    )
    _store(ctx).add(entry)
    where = ""
    if backend_name == "aws":
        from fanout.schedules.aws import group_name

        where = f" (EventBridge schedule {group_name()}/{name})"
    click.echo(f"schedule {name} added{where}: {entry.expression}, first fire {iso(first)}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Every schedule, with its next fire time."""
    now = now_utc()
    entries = _store(ctx).list()
    for entry in entries:
        nxt = entry.next_fire(now)
        if as_json:
            click.echo(
                json.dumps({**entry.model_dump(mode="json"), "next": iso(nxt) if nxt else None})
            )
            continue
        click.echo(
            f"{entry.name:<24} {entry.expression:<28} {Path(entry.job).name:<24}"
            f" overlap {entry.overlap:<5} catch-up {entry.catch_up:<6}"
            f" next {iso(nxt) if nxt else '-'}"
        )
    if not entries and not as_json:
        click.echo("no schedules (add one with `fanout schedule add`)", err=True)


@schedule.command("show")
@click.argument("name")
@click.option("-n", "count", type=click.IntRange(min=1, max=1000), default=5, show_default=True)
@click.option("--after", metavar="ISO-TIME", help="List fire times after this (default: now).")
@click.pass_context
def show(ctx: click.Context, name: str, count: int, after: str | None) -> None:
    """Schedule NAME and its next fire times."""
    store = _store(ctx)
    entry = _get(store, name)
    since = parse_time(after, "--after") if after else now_utc()
    click.echo(f"schedule {entry.name}: {entry.expression}")
    click.echo(f"  job: {entry.job}")
    click.echo(f"  params: {json.dumps(entry.params)}")
    click.echo(f"  overlap: {entry.overlap}  catch-up: {entry.catch_up}")
    click.echo(f"  start: {iso(entry.start)}  created: {iso(entry.created_at)}")
    last = store.last_tick(name)
    if last is not None:
        click.echo(f"  last tick: {iso(last)}")
    # Nothing fires before the schedule's start (which is inclusive).
    first = entry.next_fire(since)
    fires = [first, *entry.spec.fires(first, count - 1)] if first is not None else []
    click.echo("  next: " + (", ".join(iso(t) for t in fires) if fires else "(never again)"))


@schedule.command("remove")
@click.argument("name")
@click.pass_context
def remove(ctx: click.Context, name: str) -> None:
    """Remove schedule NAME (runs it started are kept)."""
    if not _a_name(name) or not _store(ctx).remove(name):
        raise UserError(f"no schedule named {name!r} (see `fanout schedule list`)")
    click.echo(f"schedule {name} removed")


def _a_name(name: str) -> bool:
    """Whether ``name`` is one a schedule can have (what is not is not looked up:
    it may not even be text a store takes)."""
    return re.fullmatch(NAME_PATTERN, name) is not None


def _get(store: ScheduleStore, name: str) -> Schedule:
    entry = store.get(name) if _a_name(name) else None
    if entry is None:
        raise UserError(f"no schedule named {name!r} (see `fanout schedule list`)")
    return entry


def _report(result: Fired) -> None:
    click.echo(str(result))


@click.command("scheduler")
@click.option(
    "--at",
    "at",
    metavar="ISO-TIME",
    help="Fire exactly what is due at this instant, then exit (testing schedules).",
)
@click.pass_context
def scheduler(ctx: click.Context, at: str | None) -> None:
    """Submit the runs of due schedule ticks, until Ctrl-C / SIGTERM.

    Several schedulers may share a home: each tick is claimed by one of them.
    Workers run what it submits (or use `fanout worker --with-scheduler`).
    """
    # Here, not at the top: firing imports the coordinator (and pydantic),
    # which `fanout --help` and the other schedule commands do without.
    from fanout.schedules.fire import fire_due, run_loop

    backend_name = ctx.obj["backend_name"]
    if at is not None:
        when = parse_time(at, "--at")
        results = fire_due(group_backend(ctx), _store(ctx), when)
        for result in results:
            _report(result)
        if not results:
            click.echo(f"nothing due at {iso(when)}", err=True)
        if any(r.outcome == "failed" for r in results):
            ctx.exit(EXIT_FAILED)
        return
    if backend_name == "aws":
        raise UserError(
            "on AWS, EventBridge Scheduler fires the schedules; `fanout scheduler`"
            " without --at is the local backend's loop"
        )
    backend, store = group_backend(ctx), _store(ctx)
    stop = SharedFlag()  # set by the handler: a threading.Event could deadlock there
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    count = len(store.list())
    click.echo(f"fanout scheduler: {count} schedules on {ctx.obj['home']} (Ctrl-C stops)", err=True)
    try:
        run_loop(backend, store, stop, report=_report)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop.close()
    click.echo("fanout scheduler: stopped", err=True)
