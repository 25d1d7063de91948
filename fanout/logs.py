"""Logging set-up: JSON lines for machines (CloudWatch), text for people, and a
level per stage, so production pays only for the lines it needs.

Every chunk event the runner logs (claimed, continued, committed, retried, dead)
carries its fields under the record's ``fanout`` attribute (``ctx.log`` does the
same for a job's own lines); :class:`JsonFormatter` lifts them to the top level::

    {"ts": "2026-11-22T14:01:02.345Z", "level": "INFO", "logger": "fanout.runner",
     "msg": "task ...:0/3#0 attempt 1 committed: 800 records in 0.120s",
     "run_id": "...", "chunk_id": "0/3", "seq": 0, "attempt": 1, "event": "committed",
     "duration_s": 0.12, "records": 800, "bytes": 12345, "remaining_s": 59.88}

Configuration (:func:`configure_logging`, called by the CLI, and by the Lambda
handler at cold start):

- level: ``-v``/``-vv`` on the command line, else ``FANOUT_LOG_LEVEL`` (a name
  such as ``INFO``, or a number), else Lambda's own ``AWS_LAMBDA_LOG_LEVEL``, else
  by stage (``FANOUT_STAGE``): ``dev`` logs INFO, every other stage (and no stage)
  WARNING, which keeps the per-chunk INFO lines out of a production bill;
- format: ``FANOUT_LOG_FORMAT=json|text``; JSON by default on Lambda, text elsewhere;
- botocore, boto3, urllib3 and s3transfer stay at WARNING whatever the level,
  unless asked for with ``-vv``: their DEBUG output is several lines per request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

LEVEL_ENV = "FANOUT_LOG_LEVEL"
FORMAT_ENV = "FANOUT_LOG_FORMAT"
FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Libraries whose DEBUG lines are noise (and, on CloudWatch, cost).
NOISY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
#: The chunk fields, in the order a JSON line shows them (after ts, level, logger, msg).
CHUNK_FIELDS = (
    "run_id",
    "chunk_id",
    "seq",
    "attempt",
    "event",
    "duration_s",
    "records",
    "bytes",
    "remaining_s",
)
_BASE_KEYS = ("ts", "level", "logger", "msg")
_MARK = "_fanout_handler"  # set on the handler this module installs, to replace it


def running_on_lambda() -> bool:
    """Whether this process is an AWS Lambda function (its runtime sets this)."""
    return "AWS_LAMBDA_FUNCTION_NAME" in os.environ


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601, ms), ``level``,
    ``logger``, ``msg``, then the record's ``fanout`` fields (chunk fields first),
    then ``exc`` with the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fanout", None)
        if isinstance(fields, dict):
            for name in CHUNK_FIELDS:
                if name in fields:
                    out[name] = fields[name]
            for name, value in fields.items():
                # A job's own extra fields never overwrite the line's own keys.
                if name not in out and name not in _BASE_KEYS:
                    out[str(name)] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _StreamHandler(logging.Handler):
    """Writes to ``stream``, or to whatever ``sys.stderr`` is at the time of each
    record (so a test runner that swaps stderr, or a forked child, gets the lines)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record and a newline."""
        try:
            stream = self._stream if self._stream is not None else sys.stderr
            line = self.format(record) + "\n"
            if self._stream is None and getattr(stream, "closed", False):
                # A job's chunk closed sys.stderr (fd 2 stays open; the runner
                # opens the stream again once the chunk is settled). The lines
                # of its failure, logged before that, go to fd 2 itself: written
                # to the closed stream they raised, and the retry was lost.
                os.write(2, line.encode("utf-8", "backslashreplace"))
                return
            stream.write(line)
            stream.flush()
        except Exception:
            self.handleError(record)


def whole_lines(*streams: TextIO) -> None:
    """Make ``streams`` write whole lines, one ``write`` each: several
    processes share stderr (the CLI, every worker, the chunks they run), and
    unbuffered (``PYTHONUNBUFFERED``, common in containers and CI) a print is
    a write per argument, which the others' writes interleave with, mangling
    a third of a chatty job's lines under load. Buffered, a full 8 KiB buffer
    goes in one write over ``PIPE_BUF``, which a pipe need not keep whole."""
    for stream in streams:
        reconfigure = getattr(stream, "reconfigure", None)  # not on a test's StringIO
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(line_buffering=True, write_through=False)


def _parse_level(text: str) -> int | None:
    text = text.strip()
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    return level if isinstance(level, int) else None


def stage_level(stage: str | None) -> int:
    """The default level of a stage: INFO for ``dev``, WARNING for any other."""
    return logging.INFO if stage == "dev" else logging.WARNING


def resolve_level(verbose: int = 0, stage: str | None = None) -> tuple[int, str | None]:
    """The level to log at (see the module doc), and a complaint about a bad
    ``FANOUT_LOG_LEVEL`` (None if it was fine or unset)."""
    if verbose:
        return (logging.INFO if verbose == 1 else logging.DEBUG), None
    complaint = None
    for name in (LEVEL_ENV, "AWS_LAMBDA_LOG_LEVEL"):
        value = os.environ.get(name)
        if not value:
            continue
        level = _parse_level(value)
        if level is not None:
            return level, complaint
        complaint = complaint or f"{name}={value!r} is not a log level; using the stage default"
    return stage_level(stage), complaint


def configure_logging(
    verbose: int = 0,
    *,
    stage: str | None = None,
    fmt: str | None = None,
    stream: TextIO | None = None,
) -> int:
    """Set up the root logger (see the module doc); returns the level chosen.

    ``verbose``: the CLI's ``-v`` count (it wins over the environment);
    ``stage``: default ``FANOUT_STAGE``; ``fmt``: ``json`` or ``text``, default
    ``FANOUT_LOG_FORMAT``; ``stream``: default stderr. Safe to call again: the
    handler it installed before is replaced, never doubled."""
    stage = stage if stage is not None else os.environ.get("FANOUT_STAGE")
    level, complaint = resolve_level(verbose, stage)
    wanted = (fmt or os.environ.get(FORMAT_ENV) or "").strip().lower()
    if wanted and wanted not in FORMATS:
        complaint = complaint or f"{FORMAT_ENV}={wanted!r} is not json or text; using the default"
        wanted = ""
    json_lines = wanted == "json" or (not wanted and running_on_lambda())
    formatter: logging.Formatter = JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    # Lambda's runtime installs its own handler (it tags lines with the request
    # id and writes to the function's log stream): reformat it, do not add a
    # second one that would print every line twice.
    runtime = [h for h in root.handlers if type(h).__name__.startswith("LambdaLoggerHandler")]
    if runtime and stream is None:
        for handler in runtime:
            handler.setFormatter(formatter)
    else:
        ours = _StreamHandler(stream)
        ours.setFormatter(formatter)
        setattr(ours, _MARK, True)
        root.addHandler(ours)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        # -vv asks for everything; otherwise their DEBUG and INFO stay out.
        logging.getLogger(name).setLevel(logging.NOTSET if verbose >= 2 else logging.WARNING)
    if complaint:
        logging.getLogger("fanout.logs").warning(complaint)
    return level
