"""Errors fanout raises on purpose.

A :class:`UserError` is bad input from the person at the keyboard (a missing job
file, params that do not validate, an unknown run id): the CLI prints its
message on one line and exits 2, never a traceback.
"""

from __future__ import annotations


class FanoutError(Exception):
    """Base of fanout's own errors."""


class UserError(FanoutError):
    """Bad input from the user: shown as one line, exit code 2."""


class JobLoadError(UserError):
    """A job file or module that does not exist, does not import, or defines no job."""


class ParamsError(UserError):
    """Run params that do not validate against the job's Params model."""


class SchemaError(UserError):
    """An Avro schema that cannot be found or does not parse."""


class UnknownRunError(UserError):
    """A run id the ledger does not know."""


class PermanentError(FanoutError):
    """A chunk failure that retrying cannot fix: the chunk is dead-lettered at once."""


class NotJsonError(PermanentError, TypeError):
    """A cursor (``ctx.resume_at``) or a spawned payload (``ctx.spawn``) that no
    message can carry: the job's mistake, which no retry fixes. Still a
    ``TypeError``, as it was, for a job that catches one."""


class RecordError(PermanentError):
    """A record that does not fit its schema (the message names the field)."""


class RunFinalizingError(UserError):
    """A run that cannot be reopened now: a finalizer is writing its manifest.

    Reopening it then would let a second finalizer run beside the first, and
    the manifest written last (possibly the first's, without the replayed
    records) would be the run's."""
