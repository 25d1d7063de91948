"""What a chunk sees: its params and cursor, the time it has left, and the ways
to emit records, spawn children and checkpoint."""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from fanout.errors import NotJsonError, PermanentError, RecordError
from fanout.inputs import list_inputs, open_input
from fanout.json_fields import storable, value_problem
from fanout.messages import encode_payload

if TYPE_CHECKING:
    from fanout.avro import RecordWriter
    from fanout.backends.base import RunRecord, Store
    from fanout.backends.crawlstate import CrawlState
    from fanout.limits import RunLimits


class RunProbe(Protocol):
    """The run as a chunk sees it while it runs (``fanout.control_gate.Probe``)."""

    def __call__(self) -> str | None:
        """``"cancelled"``, ``"paused"`` or None."""

    def run(self) -> RunRecord | None:
        """The run's record now."""


#: The longest ``spawn`` delay (s). SQS keeps a message 14 days at most, however
#: often it is re-delayed, so a longer wait would outlive its message.
MAX_SPAWN_DELAY = 12 * 24 * 3600.0

#: The longest reason ``stop_run`` keeps, in characters (the rest is cut).
MAX_STOP_REASON = 1000

#: What ``time_left()`` assumes a commit moves a second (bytes of output): a
#: local copy and fsync (~450 MB/s on a cloud VM's disk), an S3 upload from
#: Lambda (~60-100 MB/s), with room for a slower disk. A chunk of a few MB
#: keeps back a few hundredths of a second.
COMMIT_RATE = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Continue:
    """Returned by ``ctx.resume_at(cursor)``: checkpoint here, continue in a fresh chunk."""

    cursor: Any


@dataclass(frozen=True, slots=True)
class Spawn:
    """A child chunk asked for by ``ctx.spawn``."""

    payload: Any
    delay: float
    #: ``payload`` as compact JSON, encoded once by ``spawn``'s own check: the
    #: child's message body is built from it (``fanout.messages.encode_child``).
    text: str


class ChunkLogger(logging.LoggerAdapter[logging.Logger]):
    """``ctx.log``: a logger whose records carry the run id, chunk id and attempt."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.pop("extra", None) or {})
        kwargs["extra"] = {"fanout": extra}
        return msg, kwargs


class ChunkContext:
    """The context passed to ``@job.plan`` and ``@job.process`` functions."""

    def __init__(
        self,
        *,
        params: Any,
        run_id: str,
        chunk_id: str,
        seq: int,
        attempt: int,
        cursor: Any,
        soft_deadline: float,
        writer: RecordWriter | None,
        job_name: str,
        crawl: CrawlState | None = None,
        settings: RunLimits | None = None,
        store: Store | None = None,
        token: str = "",
        probe: RunProbe | None = None,
        plan: bool = False,
    ) -> None:
        self.params = params
        self._plan = plan  # the run's plan: it makes the first chunks, in one call
        self.run_id = run_id
        self.chunk_id = chunk_id
        self.seq = seq
        self.attempt = attempt
        self.cursor = cursor
        self._soft_deadline = soft_deadline  # time.monotonic() value
        self._writer = writer
        self._job_name = job_name
        # For engine-level jobs (a crawl's seen-set, domain leases and shared
        # robots.txt), not user code: the crawl state, the store, the attempt's lease.
        self._crawl = crawl
        self._store = store
        self._token = token
        #: Run controls (fanout.control_gate): "cancelled" or "paused" once the run is.
        self._probe = probe
        #: The run's settings (retry, bounds, codec, pages_per_chunk).
        self.settings = settings
        if writer is not None:
            # The hot path: one call per record, straight into the writer.
            self.emit = writer.add  # type: ignore[method-assign]
        self.spawned: list[Spawn] = []
        #: The job's code returned (:meth:`end`): what it asks for now is refused.
        self._ended = False
        #: Why the job ended its run (:meth:`stop_run`), else None.
        self.stop_reason: str | None = None
        #: The checkpoint ``resume_at`` made last, to check it was returned.
        self._resumed: Continue | None = None
        #: Whether the job asked :meth:`time_left`: one that never did cannot
        #: have stopped for lack of time.
        self.asked_time = False
        #: Counters added to the run's stats when the chunk commits (``fanout status``).
        self.stats: Counter[str] = Counter()

    @functools.cached_property
    def log(self) -> ChunkLogger:
        """A logger whose records carry the chunk's identity (run, chunk, seq,
        attempt). Made on first use: most chunks never log."""
        return ChunkLogger(
            logging.getLogger(f"fanout.job.{self._job_name}"),
            {
                "run_id": self.run_id,
                "chunk_id": self.chunk_id,
                "seq": self.seq,
                "attempt": self.attempt,
            },
        )

    def time_left(self) -> float:
        """Seconds left before the soft deadline (checkpoint when this gets small),
        less the time committing the output written so far will take (at
        :data:`COMMIT_RATE`); 0 once the run is cancelled or paused."""
        self.asked_time = True  # (a continuation that made no progress: see no_progress)
        if self._probe is not None and self._probe() is not None:
            return 0.0
        left = self._soft_deadline - time.monotonic()
        if self._writer is not None:
            # The commit copies and syncs the file (locally) or uploads it: a
            # chunk writing hundreds of MB ran to the soft deadline, and its
            # commit then ran past the hard one, attempt after attempt.
            left -= self._writer.size / COMMIT_RATE
        return left

    @property
    def cancelled(self) -> bool:
        """Whether the run was cancelled (``fanout cancel``): checkpoint and return."""
        return self.told_to_stop == "cancelled"

    @property
    def told_to_stop(self) -> str | None:
        """``"cancelled"`` or ``"paused"`` once the run is (read at most once a
        second), else None."""
        return self._probe() if self._probe is not None else None

    def _run_so_far(self) -> RunRecord | None:
        """The run's record now: records and stats of its committed chunks, its
        start (a ledger read; fanout's CrawlJob counts Scrapy's CLOSESPIDER_*
        run-wide with it). None outside a worker."""
        return self._probe.run() if self._probe is not None else None

    def resume_at(self, cursor: Any) -> Continue:
        """Checkpoint: ``return ctx.resume_at(cursor)`` ends this chunk; a continuation
        runs the same payload with ``ctx.cursor == cursor``. The cursor must be JSON.
        Not in a plan: it would end the plan with its other chunks never made."""
        if self._plan:
            raise PermanentError(
                "ctx.resume_at() is for process, not plan: a plan makes the run's first"
                " chunks in one call (to list a lot, yield a chunk that lists a page,"
                " spawns a chunk per item and resumes at the next page)"
            )
        if cursor is None:
            # None is what a chunk's first slice sees: its continuation could
            # not tell that it is one, and would start the chunk over.
            raise PermanentError(
                "ctx.resume_at(None): None is the cursor of a chunk's first slice;"
                " resume at a value (an offset, a key, a page token)"
            )
        _check_json(cursor, "ctx.resume_at: the cursor")
        # Once per chunk, so checked here in full, where the job's traceback
        # points at its call: a message's rules, beyond what json encodes (it
        # turns int keys into strings, writes lone surrogates, nests any depth).
        problem = value_problem(cursor, "cursor")
        if problem is not None:
            raise NotJsonError(
                f"ctx.resume_at: the cursor is not JSON a message can carry: {problem}"
            )
        self._resumed = Continue(cursor)
        return self._resumed

    def stop_run(self, reason: str) -> None:
        """End the run once this chunk commits, saying ``reason``: no chunk of it
        starts afterwards (queued ones are cancelled, running ones finish) and
        what this chunk spawns or resumes is dropped. The run ends as one that
        ran out of work (succeeded, or failed with dead chunks), ``reason``
        shown (its first :data:`MAX_STOP_REASON` characters). A spider's
        ``CloseSpider`` does this."""
        self._still_running("stop_run")
        reason = storable(str(reason)) or "stop_run"  # (a lone surrogate: escaped)
        if len(reason) > MAX_STOP_REASON:
            # It is kept on the run's record, which a DynamoDB item bounds (400 KB):
            # a reason past that would refuse the commit itself, again and again.
            reason = reason[:MAX_STOP_REASON] + " [...]"
        self.stop_reason = reason

    def end(self) -> None:
        """The job's code returned: a ``spawn`` or ``stop_run`` from a thread it
        left running raises from now on, as a late ``emit`` does, where it was
        dropped in silence (the children it asked for never existed)."""
        self._ended = True

    def _still_running(self, what: str) -> None:
        if self._ended:
            raise RuntimeError(
                f"ctx.{what}() called after chunk {self.chunk_id} ended (from a thread"
                " the job left running?): it would be lost"
            )

    def outcome(self, result: Any) -> Continue | None:
        """What the job's ``process`` returned, as the chunk's end: None, or the
        checkpoint of ``return ctx.resume_at(cursor)``. Anything else raises
        :class:`PermanentError`: it would otherwise be dropped in silence, and
        the chunk's work with it (a generator never run, a checkpoint made but
        not returned, whose continuation would never start)."""
        if isinstance(result, Continue):
            return result
        if self._resumed is not None:
            raise PermanentError(
                "process called ctx.resume_at() but did not return its result"
                f" (returned {_what(result)}): write `return ctx.resume_at(cursor)`"
            )
        if result is not None:
            raise PermanentError(
                f"process returned {_what(result)}; it must return None, or"
                " ctx.resume_at(cursor) to checkpoint (records go out through ctx.emit)"
            )
        return None

    def emit(self, record: dict[str, Any]) -> None:
        """Write one output record (checked against the job's Avro schema)."""
        if self._writer is None:
            raise RecordError(f"job {self._job_name} has no schema, so it cannot emit records")
        self._writer.add(record)

    def spawn(self, payload: Any, delay: float = 0.0) -> None:
        """Start a child chunk with ``payload`` (JSON) once this chunk commits,
        after ``delay`` seconds."""
        self._still_running("spawn")
        text = _check_json(payload, "ctx.spawn: the payload")
        delay = float(delay)
        if not 0 <= delay <= MAX_SPAWN_DELAY:  # also false for NaN
            raise PermanentError(
                f"spawn delay {delay!r} is not between 0 and {MAX_SPAWN_DELAY:g} s (12 days);"
                " for longer waits, schedule a run (fanout schedule add)"
            )
        limit = self.settings.max_chunks if self.settings is not None else None
        if limit is not None and len(self.spawned) >= limit:
            # A run registers at most max_chunks chunks: stop a runaway plan or
            # spawn loop here, before it holds millions of payloads in memory.
            raise PermanentError(
                f"chunk {self.chunk_id} spawns more than max_chunks ({limit}) children;"
                " a run registers at most that many chunks (raise it with -S max_chunks=N)"
            )
        self.spawned.append(Spawn(payload, delay, text))

    def spawn_many(self, payloads: Iterable[Any], delay: float = 0.0) -> int:
        """``spawn`` each of ``payloads`` (say ``fanout.batched(items, max_items=1000)``);
        returns how many."""
        count = 0
        for payload in payloads:
            self.spawn(payload, delay)
            count += 1
        return count

    @property
    def records(self) -> int:
        """Records emitted so far by this chunk."""
        return self._writer.count if self._writer is not None else 0

    def list(self, prefix: str) -> list[str]:
        """Input files under a local directory or ``s3://`` prefix, sorted."""
        return list_inputs(prefix)

    def open(self, path: str) -> BinaryIO:
        """Open an input (local path or ``s3://`` URL) for binary reading."""
        return open_input(path)


def _check_json(value: Any, what: str) -> str:
    """``value`` as a message body holds it (``fanout.messages.encode_payload``);
    a :class:`NotJsonError` naming ``what`` if it is not JSON: the job's
    mistake, so the chunk fails for good instead of being retried."""
    try:
        return encode_payload(value)
    except (TypeError, ValueError) as exc:  # a set, bytes, a datetime; NaN
        raise NotJsonError(f"{what} must be JSON (no pickle): {exc}") from None
    except RecursionError:
        raise NotJsonError(f"{what} must be JSON: it is nested too deep") from None


def _what(value: Any) -> str:
    """``value`` named for an error message, cut short."""
    if value is None:
        return "None"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({text})"
