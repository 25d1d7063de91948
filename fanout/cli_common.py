"""What the command modules share: the group's backend and ``KEY=VALUE`` parsing.

A module of its own so that :mod:`fanout.cli` and the command modules it
registers (:mod:`fanout.cli_schedule`, :mod:`fanout.cli_observe`) import it
without importing each other (``python -m fanout.cli`` runs ``cli`` as
``__main__``; a command module importing ``fanout.cli`` would load it twice).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from fanout.backends import open_backend
from fanout.backends.base import Backend, RunRecord, RunState
from fanout.errors import UserError
from fanout.failures import disk_full
from fanout.json_fields import utf8

#: The longest ``--chunk-timeout`` (s): a chunk that must be stopped is stopped.
MAX_CHUNK_TIMEOUT = 86400.0
#: The largest ``--chunk-memory`` (MB, 64 TiB): past any machine's memory, a
#: limit that could never apply is a typo (an extra digit, bytes for MB).
MAX_CHUNK_MEMORY = 64 * 1024 * 1024
#: The most ``--workers``: a typo (``-w 1000``) forks no storm of processes,
#: and past this many one SQLite file's write lock is the limit anyway.
MAX_WORKERS = 256
#: Exit code of a command whose run failed or was stopped.
EXIT_FAILED = 1


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and infinities: a NaN passes
    every comparison, and an endless timeout or interval would never end."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class RunId(click.ParamType[str]):
    """A run id argument: refuses an empty or blank one (an unset shell variable,
    ``fanout cat "$RUN"``), which the commands that take an optional run id
    would otherwise have read as none given, the latest run."""

    name = "run_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("the run id is empty (see `fanout runs` for the run ids)", param, ctx)
        if isinstance(value, str) and not utf8(value):
            # (an argument of bytes that are not UTF-8: no ledger takes it)
            self.fail(f"{value!r} is no run id: bytes that are not UTF-8", param, ctx)
        return value


#: The type of every command's run id argument.
RUN_ID = RunId()


def group_backend(ctx: click.Context) -> Backend:
    """The backend chosen on the ``fanout`` group (``--backend``, ``--home``),
    opened once per command and closed with it."""
    obj = ctx.ensure_object(dict)
    if "backend" not in obj:
        if obj["backend_name"] == "aws":
            patient = ctx.command.name in PATIENT_COMMANDS or bool(ctx.params.get("watch"))
            backend = _open_aws_stage(patient=patient)
        else:
            try:
                backend = open_backend(obj["backend_name"], home=obj["home"])
            except (OSError, sqlite3.Error) as exc:  # under a file, in /proc, read-only, full ...
                raise UserError(home_problem(obj["home"], exc)) from None
        ctx.call_on_close(backend.close)
        obj["backend"] = backend
    result: Backend = obj["backend"]
    return result


def open_std_streams() -> None:
    """Put ``/dev/null`` on fd 0, 1 or 2 if the command was started with it
    closed (``>&-``, as cron jobs and daemons may be), and give Python streams
    for them. Python leaves ``sys.stdout`` None then: the worker's children
    died flushing it and were started again, for ever; ``fanout run`` with
    stderr closed exited 1 in silence, its run left with no worker. And the
    next file opened (the ledger's database) would be given the free fd, and
    the command's output with it."""
    for fd in (0, 1, 2):
        try:
            # Open, and for output writable: a launcher's shell script left
            # read-only on fd 2 (a pyenv shim run with `2>&-`) fails every write.
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)  # OSError if closed
            usable = fd == 0 or flags & os.O_ACCMODE != os.O_RDONLY
        except OSError:
            usable = False
        if not usable:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, encoding="utf-8", closefd=False))  # noqa: SIM115


def bulk_stdout() -> Any:
    """``sys.stdout`` for many lines of output (``cat``, ``read``): buffered in
    blocks, unless it is a terminal. Under ``PYTHONUNBUFFERED`` (set in many
    containers and CI) each record was a write of its own: ``fanout cat`` into a
    pipe ran at half the speed (a million records: 21.4 s, 11.8 s without)."""
    out = sys.stdout
    reconfigure = getattr(out, "reconfigure", None)  # (not on a test's StringIO)
    if reconfigure is not None and not out.isatty():
        with contextlib.suppress(ValueError, OSError):
            reconfigure(write_through=False, line_buffering=False)
    return out


def home_problem(home: Path, exc: BaseException) -> str:
    """One line naming why ``home`` cannot serve as fanout's home, from the file
    system it is on (read-only, full) when that says, else from ``exc``."""
    found = Path(home).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent  # the home may not exist yet: its file system does
    why = None
    with contextlib.suppress(OSError):
        st = os.statvfs(found)
        if st.f_flag & os.ST_RDONLY:
            why = "it is on a read-only file system"
        elif disk_full(st):
            why = "its disk is full (no space left on the device)"
        elif st.f_favail == 0 and st.f_files > 0:  # room for bytes, none for a new file
            why = "its file system has no free inodes (no space left on the device)"
    if why is None and isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        # The home's file system has room: the full device is another one
        # (`fanout run > /dev/full` was told its home's disk was full).
        where = exc.filename or "standard output, or a file the job writes"
        return f"cannot write: no space left on the device of {where} (the home {home} has room)"
    if why is None and isinstance(exc, OSError):
        why = f"{exc.filename or home}: {exc.strerror or exc}"
    if why is None and found.is_dir() and not os.access(found, os.W_OK):
        why = f"{found} is not writable"
    return f"cannot use {home} as fanout's home: {why or exc}"


#: botocore's errors that say AWS cannot be reached or signed in to from here:
#: the user's to fix (an endpoint, credentials, a region), not a bug.
_AWS_UNREACHABLE = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ProxyConnectionError",
        "SSLError",  # https to a plain-HTTP endpoint, a proxy that intercepts TLS
        "ReadTimeoutError",  # an endpoint that takes connections and never answers
    }
)
#: botocore's errors of the AWS configuration files or profile named.
_AWS_CONFIG = frozenset({"ProfileNotFound", "ConfigParseError", "ConfigNotFound"})
_AWS_NO_CREDENTIALS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)


def aws_problem(exc: BaseException) -> str | None:
    """One line for an AWS error a user fixes where they run fanout (no endpoint,
    no credentials, no region); None for anything else."""
    if isinstance(exc, ValueError) and str(exc).startswith("Invalid endpoint"):
        return f"{exc} (check AWS_ENDPOINT_URL: a URL such as https://host:port)"
    if not type(exc).__module__.startswith("botocore"):
        return None
    name = type(exc).__name__
    if name in _AWS_UNREACHABLE:
        return f"cannot reach AWS: {exc} (check the network, or AWS_ENDPOINT_URL)"
    if name in _AWS_NO_CREDENTIALS:
        return f"no usable AWS credentials: {exc}"
    if name in _AWS_CONFIG:
        return f"{exc} (check AWS_PROFILE and AWS_CONFIG_FILE)"
    if name == "NoRegionError":
        return "no AWS region: set AWS_REGION or AWS_DEFAULT_REGION"
    if name == "InvalidRegionError":
        return f"{exc} (check AWS_REGION or AWS_DEFAULT_REGION)"
    return None


#: Commands that work long or in bulk, often unattended (the queue, the
#: dashboard, a run's cancel or replay, the store's garbage and compaction):
#: their AWS calls keep every retry, as does ``status --watch``. Any other
#: command is a quick one a person waits on at a prompt.
PATIENT_COMMANDS = frozenset(
    {"run", "worker", "ui", "gc", "compact", "catalog", "cancel", "replay", "deploy"}
)


def _open_aws_stage(patient: bool) -> Backend:
    """The AWS backend of ``FANOUT_STAGE``: its stack's resources (put in the
    environment for worker children too), or one line saying it is not deployed.
    Not ``patient``: its calls give up after botocore's default 3 attempts."""
    from fanout.backends.aws import clients
    from fanout.backends.aws.stack import export_stage, not_deployed

    if not patient:
        clients.limit_attempts(clients.INTERACTIVE_ATTEMPTS)

    export_stage()
    try:
        return open_backend("aws")
    except Exception as exc:
        error = not_deployed(exc)
        if error is not None:
            raise error from None
        raise


def split_pairs(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` options as a dict. A JSON list or object is taken as such;
    everything else is a string that the job's pydantic model converts (so "2"
    fits an int field)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {pair!r} is not KEY=VALUE")
        if key in out:
            # The last one won: a typo'd repeat went unnoticed. (A --params-file
            # value is overridden by a --param of the same key, on purpose.)
            raise UserError(f"{what} {key!r} is given twice")
        if not utf8(pair):  # bytes that are not UTF-8, as the shell passed them
            raise UserError(f"{what} {key!r}: the value is not valid UTF-8 text")
        if value[:1] in "[{":
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
            except (ValueError, RecursionError) as exc:  # JSON Python cannot read
                raise UserError(f"{what} {key!r}: {unreadable_json(exc)}") from None
        out[key] = value
    return out


def unreadable_json(exc: ValueError | RecursionError) -> str:
    """Why valid JSON could not be read: ``json.loads`` raises these (besides a
    ``JSONDecodeError``) for an integer too long to convert or nesting too deep."""
    if isinstance(exc, RecursionError):
        return "the JSON is nested too deep"
    return f"the JSON has an integer of more than {sys.get_int_max_str_digits()} digits"


def exit_code(run: RunRecord) -> int:
    """0 for a run that succeeded (within its tolerated failures too), else
    :data:`EXIT_FAILED`."""
    ok = (RunState.SUCCEEDED, RunState.SUCCEEDED_WITH_FAILURES)
    return 0 if run.state in ok else EXIT_FAILED


def human(n: float) -> str:
    """``950``, ``12.3k``, ``4.5M``: a rate or count, three significant digits."""
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.3g}T"


def counted(n: int, noun: str) -> str:
    """``1 dead chunk``, ``2 dead chunks``: ``n`` of ``noun`` in English."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def utc_time(at: float, millis: bool = False) -> str:
    """A Unix time as ``2026-11-22 16:14:25Z`` (UTC, like run ids and schedules),
    with milliseconds when asked."""
    stamp = datetime.fromtimestamp(at, UTC)
    text = stamp.strftime("%Y-%m-%d %H:%M:%S")
    if millis:
        text += f".{stamp.microsecond // 1000:03d}"
    return text + "Z"
