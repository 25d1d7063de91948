"""The ``fanout`` command line.

Exit codes: 0 success, 1 the run failed (or was stopped), 2 bad usage or bad
input. A user error prints one line naming the problem, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fanout.backends import default_home
from fanout.backends.base import TERMINAL_RUN_STATES, Backend
from fanout.backends.keys import collected_key
from fanout.backends.rules import was_cancelled
from fanout.cli_common import (
    MAX_CHUNK_MEMORY,
    MAX_CHUNK_TIMEOUT,
    MAX_WORKERS,
    RUN_ID,
    FiniteFloat,
    aws_problem,
    bulk_stdout,
    exit_code,
    group_backend,
    home_problem,
    open_std_streams,
    split_pairs,
    unreadable_json,
)
from fanout.cli_controls import COMMANDS as CONTROL_COMMANDS
from fanout.cli_controls import progress_line, run_summary, status_fields, status_line
from fanout.cli_lazy import LAZY_COMMANDS
from fanout.controls import stop_line
from fanout.errors import UserError
from fanout.failures import cannot_write
from fanout.jobs import load_checked
from fanout.limits import RunKind, RunLimits, kind_of

# The coordinator (and with it pydantic, ~0.1 s) is imported by the commands
# that use it: the control commands, `fanout run --help` and `fanout --help`
# start without it (the other modules' commands: fanout.cli_lazy).
EXIT_USAGE = 2


class _Group(click.Group):
    """Turns :class:`UserError` and click's usage errors into one line on stderr
    and exit code 2, and imports the :data:`LAZY_COMMANDS` when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``fanout --help``: a command not imported yet is
        listed by its :data:`LAZY_COMMANDS` help line, not imported for it."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                rows.append((name, LAZY_COMMANDS[name].short_help(limit)))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in LAZY_COMMANDS:
            command = LAZY_COMMANDS[cmd_name].command()
            assert command.name == cmd_name, cmd_name
            self.add_command(command)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except (OSError, sqlite3.OperationalError) as exc:
            # The local home filled up or became read-only during the command
            # (opening it is checked in group_backend): the user's to fix. (And
            # botocore's connection errors are OSErrors: said as AWS problems.)
            obj = ctx.obj or {}
            if (problem := aws_problem(exc)) is not None:
                click.echo(f"error: {problem}", err=True)
                ctx.exit(EXIT_USAGE)
            if obj.get("backend_name") == "aws" or not cannot_write(exc):
                raise
            click.echo(f"error: {home_problem(obj['home'], exc)}", err=True)
            ctx.exit(EXIT_USAGE)
        except Exception as exc:
            problem = aws_problem(exc)  # AWS unreachable, or no credentials, from here
            if problem is None:
                raise
            click.echo(f"error: {problem}", err=True)
            ctx.exit(EXIT_USAGE)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        open_std_streams()  # before any file is opened
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            # `fanout`, `fanout schedule`: the help, as --help prints it, not one line.
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            message = " ".join(exc.format_message().split())
            click.echo(f"error: {message}{where}", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


class _Repeated(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys each come once: json keeps the last of a
    repeated key in silence, and the first value would be lost unseen."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _Repeated(key)
        found[key] = value
    return found


def _params(pairs: tuple[str, ...], params_files: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if len(params_files) > 1:
        # click keeps the last of a repeated option: the first file was dropped unseen.
        raise UserError("--params-file is given more than once: give one file (and -p for more)")
    params_file = params_files[0] if params_files else None
    if params_file:
        try:
            loaded = json.loads(Path(params_file).read_text(), object_pairs_hook=_once_each)
        except _Repeated as exc:  # as a -p key given twice is
            raise UserError(f"params file {params_file} gives key {exc.key!r} twice") from None
        except FileNotFoundError:
            raise UserError(f"params file {params_file} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"params file {params_file} is not valid JSON: {exc}") from None
        except (ValueError, RecursionError) as exc:  # valid JSON Python cannot read
            raise UserError(f"params file {params_file}: {unreadable_json(exc)}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"params file {params_file} must hold a JSON object")
        params.update(loaded)
    params.update(split_pairs(pairs, "--param"))
    return params


def _latest_run(backend: Backend) -> str:
    runs = backend.ledger.list_runs(limit=1)
    if not runs:
        raise UserError("no runs yet (start one with `fanout run JOB`)")
    return runs[0].run_id


def _work(
    ctx: click.Context,
    run_id: str,
    workers: int,
    chunk_timeout: float,
    as_json: bool,
    chunk_memory: int | None = None,
) -> None:
    """Work the queue until ``run_id`` finishes, showing progress; exit with its outcome."""
    from fanout import coordinator
    from fanout.worker import WorkerOptions, WorkerPool

    backend = group_backend(ctx)
    obj = ctx.obj
    opts = WorkerOptions(
        backend=obj["backend_name"],
        home=obj["home"],
        workers=workers,
        chunk_timeout=chunk_timeout,
        chunk_memory=chunk_memory,
        only_run=run_id,
        adopt_orphans=True,  # this process has no children but the pool's
    )
    tty = sys.stderr.isatty()
    # Without a terminal, a progress line every few seconds (none for a short run).
    last_print = [time.time()]

    def tick() -> None:
        if as_json:
            return
        now = time.time()
        st, shown = coordinator.live_status(backend, coordinator.get_run(backend, run_id))
        line = progress_line(st, shown)
        if tty:
            click.echo("\r" + line.ljust(110), err=True, nl=False)
        elif now - last_print[0] >= 5.0:
            click.echo(line, err=True)
            last_print[0] = now

    def finished() -> bool:
        run = backend.ledger.get_run(run_id)
        return run is not None and run.state in TERMINAL_RUN_STATES

    pool = WorkerPool(opts)
    pool.run(until=finished, tick=tick)
    if tty and not as_json:
        click.echo("", err=True)
    status = coordinator.status(backend, run_id)
    if as_json:
        click.echo(json.dumps(status.to_dict()))
    else:
        click.echo(run_summary(status, backend))
    if not finished():
        click.echo(f"interrupted: resume with `fanout worker --until-idle` ({run_id})", err=True)
        ctx.exit(130)
    ctx.exit(exit_code(status.run))


# -- options shared by several commands ------------------------------------------


def _job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "-S",
        "--setting",
        "settings",
        multiple=True,
        metavar="KEY=VALUE",
        # The names from RunLimits (the same as RunSettings', tests/test_limits.py):
        # listing them needs no pydantic.
        help="Run setting: " + ", ".join(f.name for f in dataclasses.fields(RunLimits)) + ".",
    )(fn)
    fn = click.option(
        "--params-file",
        "params_files",
        multiple=True,  # to refuse a second one (see _params), not to merge them
        type=click.Path(dir_okay=False),
        help="JSON object of params.",
    )(fn)
    fn = click.option(
        "-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A job param."
    )(fn)
    return click.argument("job")(fn)


def _worker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--chunk-memory",
        type=click.IntRange(min=16, max=MAX_CHUNK_MEMORY),
        default=None,
        metavar="MB",
        help="Memory limit of a chunk (MB, the worker process's resident memory);"
        " a chunk over it is killed and recorded as out of memory.",
    )(fn)
    fn = click.option(
        "--chunk-timeout",
        type=FiniteFloat(min=1.0, max=MAX_CHUNK_TIMEOUT),
        default=60.0,
        show_default=True,
        help="Hard timeout of one chunk (s, at most a day); the soft deadline is 10% (at least"
        " 1 s) earlier.",
    )(fn)
    return click.option(
        "-w",
        "--workers",
        type=click.IntRange(min=1, max=MAX_WORKERS),
        default=min(os.cpu_count() or 1, MAX_WORKERS),
        show_default=True,
        help="Worker processes.",
    )(fn)


def _home(value: str | None) -> Path | None:
    # `--home ""` (an unset shell variable) would be the current directory:
    # fanout's database and store spread among the user's own files.
    if value == "":
        raise click.BadParameter("is empty (an unset variable?); give a directory")
    return None if value is None else Path(value)


#: The backends a command may use.
CLI_BACKENDS = ("local", "aws")


# -- commands --------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    callback=lambda ctx, param, value: _home(value),
    help="Local backend home (default: $FANOUT_HOME or ./.fanout).",
)
@click.option(
    "--backend",
    "backend_name",
    # (not "memory": a backend of one process, for tests; `run` on it waited for
    # ever, its workers each with a memory of their own)
    type=click.Choice(CLI_BACKENDS),
    default="local",
    show_default=True,
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="fanout")
@click.pass_context
def main(ctx: click.Context, home: Path | None, backend_name: str, verbose: int) -> None:
    """fanout: long jobs split into checkpointed chunks, written as Avro."""
    from fanout.logs import configure_logging, whole_lines

    # -v / -vv, else FANOUT_LOG_LEVEL, else by FANOUT_STAGE; FANOUT_LOG_FORMAT=json|text.
    configure_logging(verbose)
    whole_lines(sys.stderr)  # shared with the workers (stdout is the command's output)
    ctx.ensure_object(dict)
    ctx.obj["home"] = home or default_home()
    ctx.obj["backend_name"] = backend_name


@main.command()
@_job_options
@_worker_options
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.pass_context
def run(
    ctx: click.Context,
    job: str,
    params: tuple[str, ...],
    params_files: tuple[str, ...],
    settings: tuple[str, ...],
    workers: int,
    chunk_timeout: float,
    chunk_memory: int | None,
    as_json: bool,
) -> None:
    """Submit JOB and work it to completion on this machine."""
    from fanout import coordinator

    record = coordinator.submit(
        group_backend(ctx), job, _params(params, params_files), split_pairs(settings, "--setting")
    )
    if not as_json:
        click.echo(f"run {record.run_id}", err=True)
    _work(ctx, record.run_id, workers, chunk_timeout, as_json, chunk_memory)


@main.command()
@_job_options
@click.pass_context
def submit(
    ctx: click.Context,
    job: str,
    params: tuple[str, ...],
    params_files: tuple[str, ...],
    settings: tuple[str, ...],
) -> None:
    """Submit JOB (enqueue only) and print the run id."""
    from fanout import coordinator

    record = coordinator.submit(
        group_backend(ctx), job, _params(params, params_files), split_pairs(settings, "--setting")
    )
    click.echo(record.run_id)


@main.command()
@_worker_options
@click.option("--until-idle", is_flag=True, help="Exit once no work is left.")
@click.option(
    "--with-scheduler", is_flag=True, help="Also fire due schedules (`fanout scheduler`)."
)
@click.pass_context
def worker(
    ctx: click.Context,
    workers: int,
    chunk_timeout: float,
    chunk_memory: int | None,
    until_idle: bool,
    with_scheduler: bool,
) -> None:
    """Work the queue (all runs) until stopped with Ctrl-C / SIGTERM."""
    from fanout.worker import WorkerOptions, WorkerPool

    obj = ctx.obj
    if with_scheduler and obj["backend_name"] == "aws":
        raise UserError("on AWS, EventBridge Scheduler fires the schedules: drop --with-scheduler")
    group_backend(ctx)  # on AWS: finds the stage's stack, for the children too
    opts = WorkerOptions(
        backend=obj["backend_name"],
        home=obj["home"],
        workers=workers,
        chunk_timeout=chunk_timeout,
        chunk_memory=chunk_memory,
        adopt_orphans=True,  # this process has no children but the pool's (and the scheduler)
    )
    pool = WorkerPool(opts)
    where = obj["home"] if obj["backend_name"] == "local" else f"the {obj['backend_name']} backend"
    plural = "process" if workers == 1 else "processes"
    click.echo(f"fanout worker: {workers} {plural} on {where}", err=True)
    stop_scheduler = None
    if with_scheduler:
        from fanout.schedules.fire import start_process

        # A process beside the workers: it only submits runs, they work them.
        stop_scheduler = start_process(obj["backend_name"], obj["home"])
    try:
        pool.run(until_idle=until_idle)
    finally:
        if stop_scheduler is not None:
            stop_scheduler()
    if pool.timed_out or pool.crashed or pool.out_of_memory:
        click.echo(
            f"{pool.timed_out} chunks timed out, {pool.crashed} crashed,"
            f" {pool.out_of_memory} out of memory",
            err=True,
        )


@main.command()
@click.argument("run_id", type=RUN_ID, required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw a progress bar until the run ends; exit 0 if it succeeded.",
)
@click.option(
    "--interval",
    type=FiniteFloat(min=0.1, max=3600.0),
    default=1.0,
    show_default=True,
    help="Seconds between redraws of --watch.",
)
@click.pass_context
def status(
    ctx: click.Context, run_id: str | None, as_json: bool, watch: bool, interval: float
) -> None:
    """Progress of RUN (default: the latest run)."""
    from fanout import coordinator

    backend = group_backend(ctx)
    if watch:
        from fanout.cli_observe import watch_run

        ctx.exit(watch_run(backend, run_id or _latest_run(backend), interval, as_json))
    st = coordinator.status(backend, run_id or _latest_run(backend))
    # Run controls: state (paused, cancelling...), cap, running, waiting, tolerance.
    controls = status_fields(backend, st.run, st.tasks)
    if as_json:
        click.echo(json.dumps({**st.to_dict(), "controls": controls}))
        return
    click.echo(progress_line(st, controls["state"]))
    click.echo("chunks: " + ", ".join(f"{k} {v}" for k, v in st.tasks.items()))
    click.echo(f"bytes {st.run.bytes:,}  outstanding {st.run.outstanding}")
    click.echo(status_line(controls))
    if st.run.stop_reason:
        click.echo(stop_line(st.run.stop_reason))
    if st.timed_out or st.crashed:
        from fanout.cli_observe import failures_line

        click.echo(failures_line(st))
    if kind_of(st.run.settings) is RunKind.CRAWL:
        from fanout.cli_observe import crawl_lines

        for line in crawl_lines(dict(st.run.stats), st.pending_requests, st.backoffs):
            click.echo(line)
    elif st.run.stats:  # a job's own counters (ctx.stats)
        counters = sorted(st.run.stats.items())
        click.echo("stats: " + ", ".join(f"{k} {v:,}" for k, v in counters))
    if st.run.manifest_key and st.run.state in TERMINAL_RUN_STATES:
        if backend.store.exists(collected_key(st.run.run_id)):
            click.echo("manifest: removed with the run's files by `fanout gc --older-than`")
        else:
            click.echo(f"manifest: {backend.store.url(st.run.manifest_key)}")


@main.command()
@click.argument("run_id", type=RUN_ID)
@click.option("--chunk", "chunks", multiple=True, metavar="ID", help="Replay only this chunk.")
@_worker_options
@click.option("--work", is_flag=True, help="Also work the run to completion here.")
@click.pass_context
def replay(
    ctx: click.Context,
    run_id: str,
    chunks: tuple[str, ...],
    workers: int,
    chunk_timeout: float,
    chunk_memory: int | None,
    work: bool,
) -> None:
    """Put RUN's dead chunks back in the queue (after you fixed the job); a
    stopped run goes on with the chunks its stop cancelled."""
    from fanout import coordinator

    reopened = coordinator.replay(group_backend(ctx), run_id, chunks or None)
    n = len(reopened)
    revived = sum(was_cancelled(t) for t in reopened)
    also = f" ({revived} of them cancelled when it stopped)" if revived else ""
    click.echo(f"replaying {n} chunk{'' if n == 1 else 's'} of {run_id}{also}", err=True)
    if work:
        _work(ctx, run_id, workers, chunk_timeout, False, chunk_memory)
    elif ctx.obj["backend_name"] == "aws":
        click.echo("the stage's Lambda function takes them from the queue", err=True)
    else:
        click.echo("work them with `fanout worker --until-idle`", err=True)


@main.command()
@click.argument("run_id", type=RUN_ID, required=False)
@click.option("-n", "--limit", type=click.IntRange(min=0), default=None)
@click.pass_context
def cat(ctx: click.Context, run_id: str | None, limit: int | None) -> None:
    """The committed records of RUN as JSON lines (from its manifest)."""
    from fanout import coordinator
    from fanout.avro import to_json_safe

    backend = group_backend(ctx)
    out = bulk_stdout()
    records = coordinator.committed_records(backend, run_id or _latest_run(backend))
    try:
        for i, record in enumerate(records):
            if limit is not None and i >= limit:
                break
            out.write(json.dumps(to_json_safe(record), separators=(",", ":")) + "\n")
        out.flush()
    except BrokenPipeError:
        raise  # `fanout cat RUN | head`: the reader has what it wanted
    except OSError as exc:  # a full disk behind a redirect, ...
        raise UserError(f"cannot write the records: {exc.strerror or exc}") from None


@main.command()
@_job_options
@click.pass_context
def validate(
    ctx: click.Context,
    job: str,
    params: tuple[str, ...],
    params_files: tuple[str, ...],
    settings: tuple[str, ...],
) -> None:
    """Load JOB and its schema and check params, without running anything."""
    loaded, model = load_checked(job, _params(params, params_files))
    # The -S settings too, as `fanout submit` checks them.
    run_settings = loaded.settings.overridden(split_pairs(settings, "--setting"))
    schema = loaded.schema
    obj = ctx.obj or {}
    no_home = obj.get("backend_name") == "local" and not Path(obj["home"]).exists()
    if loaded.table_spec is not None and not no_home:  # (no home: no table yet, none made)
        # And the table's schema contract, as submit checks it (recording nothing):
        # validate said ok of a job whose submit then refused its schema change.
        from fanout.tables.contract import check_contract

        raw = schema.raw if schema else None
        check_contract(group_backend(ctx).store, loaded.table_spec, raw, loaded.name, dry_run=True)
    click.echo(f"job {loaded.name}: ok")
    click.echo(f"  schema: {schema.name if schema else '(none: emits nothing)'}")
    click.echo(f"  plan: {'yes' if loaded.plan_fn else 'no (one chunk holding the params)'}")
    shown = model.model_dump(mode="json") if hasattr(model, "model_dump") else model
    click.echo(f"  params: {json.dumps(shown)}")
    click.echo(f"  settings: {json.dumps(run_settings.model_dump(mode='json'))}")


for _command in CONTROL_COMMANDS:  # fanout cancel, pause, resume
    main.add_command(_command)

if __name__ == "__main__":
    main()
