"""What a run would cost on AWS, estimated from the run's own measured figures.

Two pure steps: :func:`measure` turns a run and its tasks (as any ledger keeps
them) into usage, counted per billed unit the way the AWS backend spends it;
:func:`price` multiplies that usage by list prices. Nothing here calls AWS.

What is counted, per chunk attempt (see ``fanout/backends/aws/``):

- **Lambda**: one request per delivery; GB-seconds from each attempt's measured
  duration (the ledger's history keeps it), rounded up to the millisecond as
  Lambda bills, at ``memory_mb``. An attempt with no measured duration (a
  takeover of a dead worker's lease) is priced at the mean of the measured ones.
- **SQS** (billed per 64 KiB of payload per request): one send per registered task
  (children of one parent batched ten to a ``SendMessageBatch``), one receive and
  one delete per delivery, one ``ChangeMessageVisibility`` per retry. Receives
  are counted one per delivery: Lambda's poller often gets more at once, so this
  is an upper bound.
- **S3**: one PUT per committed output file, dead letter, offloaded payload and
  manifest; one GET per attempt of an offloaded payload; the output stored for a
  month.
- **DynamoDB** (on demand; a write unit per KB written, two in a transaction; a
  strongly consistent read unit per 4 KB read): per claim a batch read of the
  task and the run (and the parent's state) and a conditional update; per
  commit a read of the lease, the commit transaction (task + run counters) and
  a read of the counter; per failure a read and a transaction; per
  registration a transaction (children, lease check, counters); one index
  write per task write for tasks on the parent index; per finalize two updates
  and a query of the run's tasks. Item sizes come from the tasks themselves
  (their message, history and error), so big payloads cost what they cost.
- **CloudWatch Logs**: the EMF line of each settled attempt, and Lambda's own
  START/END/REPORT lines per invocation (fanout's INFO lines are off outside
  ``dev``).

Not counted: the job's own reads (``ctx.open`` of S3 inputs), data transfer,
free tiers, the event source's idle polling, and ``fanout status`` calls.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from fanout.backends.base import FailureKind, RunRecord, TaskEvent, TaskRecord, TaskState
from fanout.metrics import ChunkMetrics, emf_document

#: History outcomes that are not an attempt settling (no lease read, no transaction).
_NOT_ATTEMPTS = frozenset({TaskEvent.ORPHANED, TaskEvent.CANCELLED, TaskEvent.REVIVED})
#: History outcomes after which a following "dead" does not undo a retry.
_NOT_FAILED = frozenset(
    {
        TaskEvent.COMMITTED,
        TaskEvent.CONTINUED,
        FailureKind.CRASHED,
        TaskEvent.REPLAYED,
        TaskEvent.DEAD,
    }
)

#: When the prices below were taken from AWS's public pricing pages.
PRICES_AS_OF = "2025-06"
REGION = "us-east-1"
#: The deploy template's default function memory (deploy/template.yaml).
DEFAULT_MEMORY_MB = 1024

SQS_UNIT = 64 * 1024  # bytes of payload billed as one SQS request
SQS_BATCH = 10  # messages per SendMessageBatch
TRANSACTION_ITEMS = 98  # task writes per registration transaction (ledger_register.py)
#: Bytes of a task item besides its message, history, error and output key
#: (attribute names, keys, counters, index keys): 250-380 in items the AWS
#: ledger wrote under moto (children carry the parent-index keys).
TASK_ITEM_BASE = 340
#: Bytes of the run item besides its params, settings, stats and ids (about 360).
RUN_ITEM_BASE = 360
#: Lambda's START, END and REPORT lines of one invocation, in bytes.
LAMBDA_PLATFORM_BYTES = 340
GB = 1024**3


@dataclass(frozen=True, slots=True)
class Prices:
    """List prices in USD (us-east-1, x86_64 Lambda, on-demand DynamoDB, S3
    Standard, SQS standard queue beyond its free tier)."""

    lambda_gb_second: float = 0.0000166667
    lambda_request: float = 0.20 / 1e6
    sqs_request: float = 0.40 / 1e6
    s3_put: float = 0.005 / 1000
    s3_get: float = 0.0004 / 1000
    s3_gb_month: float = 0.023
    dynamodb_write_unit: float = 0.625 / 1e6  # after the cut of November 2024
    dynamodb_read_unit: float = 0.125 / 1e6
    log_ingest_gb: float = 0.50


US_EAST_1 = Prices()


@dataclass(slots=True)
class Usage:
    """A run's consumption, in billed units."""

    deliveries: int = 0  # Lambda requests
    attempts: int = 0  # claims that ran the job
    measured_attempts: int = 0
    measured_seconds: float = 0.0  # sum of measured durations (ms-rounded)
    sqs_sends: int = 0
    sqs_receives: int = 0
    sqs_deletes: int = 0
    sqs_visibility: int = 0
    s3_puts: int = 0
    s3_gets: int = 0
    s3_bytes: int = 0
    dynamodb_wru: int = 0
    dynamodb_rru: int = 0
    log_bytes: int = 0

    @property
    def sqs_requests(self) -> int:
        """All SQS request units."""
        return self.sqs_sends + self.sqs_receives + self.sqs_deletes + self.sqs_visibility

    @property
    def compute_seconds(self) -> float:
        """Measured seconds, plus the unmeasured attempts at the measured mean."""
        if not self.measured_attempts:
            return 0.0
        mean = self.measured_seconds / self.measured_attempts
        return self.measured_seconds + mean * max(0, self.attempts - self.measured_attempts)


@dataclass(frozen=True, slots=True)
class Line:
    """One row of the estimate."""

    service: str
    item: str
    quantity: float
    unit: str
    unit_price: float
    cost: float


# -- measuring ---------------------------------------------------------------------


def _w(size: int) -> int:
    """Write units of one standard write of an item of ``size`` bytes."""
    return max(1, math.ceil(size / 1024))


def _r(size: int) -> int:
    """Read units of one strongly consistent read of ``size`` bytes."""
    return max(1, math.ceil(size / 4096))


def _units(size: int) -> int:
    """SQS request units of a payload of ``size`` bytes."""
    return max(1, math.ceil(size / SQS_UNIT))


def _size(text: str | None) -> int:
    return len(text.encode()) if text else 0


def run_item_size(run: RunRecord) -> int:
    """Approximate bytes of the run's ledger item."""
    return (
        RUN_ITEM_BASE
        + 2 * _size(run.run_id)
        + _size(run.job)
        + _size(run.job_name)
        + _size(json.dumps(run.params))
        + _size(json.dumps(run.settings))
        + _size(json.dumps(run.stats))
    )


def task_item_size(task: TaskRecord) -> int:
    """Approximate bytes of the task's ledger item (as it is now: its largest)."""
    return (
        TASK_ITEM_BASE
        + _size(task.message)
        + _size(json.dumps(task.history))
        + _size(task.error)
        + _size(task.traceback)
        + (_size(task.output.key) if task.output else 0)
    )


def _emf_bytes(run: RunRecord) -> int:
    """Bytes of one EMF line of this run (its ids are in every line)."""
    sample = ChunkMetrics(run.job_name, run.run_id, "0/0/0", 1, 1, "committed", 1.234, 1000, False)
    return len(json.dumps(emf_document(sample), separators=(",", ":"))) + 1


def measure(run: RunRecord, tasks: Sequence[TaskRecord]) -> Usage:
    """The run's usage (see the module doc), from its record and all its tasks."""
    u = Usage()
    run_w, run_r = _w(run_item_size(run)), _r(run_item_size(run))
    sizes = {(t.chunk_id, t.seq): task_item_size(t) for t in tasks}
    settled = retried = 0
    replayed_at: set[object] = set()  # one replay command reopens its tasks at one time
    children: dict[str, list[int]] = defaultdict(list)  # parent chunk -> message sizes
    for t in tasks:
        size = sizes[(t.chunk_id, t.seq)]
        message = _size(t.message)
        is_root = t.chunk_id == "0" and t.seq == 0
        # Tasks registered by a parent are on the parent index: one more write each time.
        gsi = 0 if is_root else 1
        claims = t.attempt
        u.attempts += claims
        # A cancelled task was delivered once, to be cancelled at its claim.
        delivered = claims + (1 if t.state == TaskState.CANCELLED else 0)
        u.deliveries += delivered
        u.sqs_receives += delivered * _units(message)
        if json.loads(t.message).get("payload_ref"):
            u.s3_puts += 1  # offloaded when registered, fetched by every attempt
            u.s3_gets += claims
        if not is_root:  # registered by its parent's transaction (the root: at submit)
            u.dynamodb_wru += 2 * _w(size) + gsi
        if t.seq > 0:
            # A continuation: sent on its own, registered in its own transaction
            # (with the lease check of the slice before it and the run's counters).
            u.sqs_sends += _units(message)
            before = sizes.get((t.chunk_id, t.seq - 1), size)
            u.dynamodb_wru += 2 * (_w(before) + run_w)
        elif not is_root:
            children[t.chunk_id.rpartition("/")[0]].append(message)
        # Claims: a consistent batch read of task and run (and the parent's
        # state), then a conditional update of the task.
        u.dynamodb_rru += claims * (_r(size) + run_r + (0 if is_root else 1))
        u.dynamodb_wru += claims * (_w(size) + gsi)
        failed = False  # the previous event was a failed attempt
        for event in t.history:
            outcome, took = event.get("outcome"), event.get("duration_s")
            if isinstance(took, int | float):
                u.measured_attempts += 1
                u.measured_seconds += math.ceil(float(took) * 1000) / 1000
            if outcome in (TaskEvent.COMMITTED, TaskEvent.CONTINUED):
                # Lease read, commit transaction (task + run), counter read.
                settled += 1
                u.dynamodb_rru += _r(size) + run_r
                u.dynamodb_wru += 2 * (_w(size) + run_w) + gsi
            elif outcome == FailureKind.CRASHED and took is None:
                # A takeover of an expired lease, at claim: a transaction (task
                # + run counters) instead of the claim's update.
                u.dynamodb_wru += _w(size) + 2 * run_w
            elif outcome == TaskEvent.REPLAYED:
                replayed_at.add(event.get("at"))
                u.sqs_sends += _units(message)
                u.dynamodb_wru += 2 * (_w(size) + run_w) + gsi
            elif outcome == TaskEvent.DEAD:
                retried -= 1 if failed else 0  # that failure was buried, not retried
            elif isinstance(outcome, str) and outcome not in _NOT_ATTEMPTS:
                # A failed attempt: lease read and a transaction (task + run).
                settled += 1
                retried += 1
                u.dynamodb_rru += _r(size)
                u.dynamodb_wru += 2 * (_w(size) + run_w) + gsi
            failed = outcome not in _NOT_FAILED
        if t.output is not None:
            u.s3_puts += 1
            u.s3_bytes += t.output.bytes
        if t.state == TaskState.DEAD:
            u.s3_puts += 1  # the dead letter
    # Children of one parent: registered in transactions of up to 98 (each with a
    # lease check and the run's counters), sent ten to a batch.
    for parent, msgs in children.items():
        parent_w = max((_w(s) for (c, _), s in sizes.items() if c == parent), default=1)
        u.dynamodb_wru += math.ceil(len(msgs) / TRANSACTION_ITEMS) * 2 * (parent_w + run_w)
        for start in range(0, len(msgs), SQS_BATCH):
            u.sqs_sends += _units(sum(msgs[start : start + SQS_BATCH]))
    # Submit: the run and its root task in one transaction; the root sent alone.
    u.dynamodb_wru += 2 * (run_w + _w(sizes.get(("0", 0), TASK_ITEM_BASE)))
    u.sqs_sends += 1
    # Each finalize (again after each replay): begin and finish, a read of the
    # run, two queries of its tasks (done, dead) billed by the bytes read, and
    # the manifest.
    finalizes = 1 + len(replayed_at)
    u.dynamodb_wru += finalizes * 2 * run_w
    u.dynamodb_rru += finalizes * (run_r + 2 * _r(sum(sizes.values())))
    u.s3_puts += finalizes
    # A retry hands its message back (ChangeMessageVisibility); every other
    # delivery is deleted.
    u.sqs_visibility = retried
    u.sqs_deletes = max(0, u.deliveries - retried)
    u.log_bytes = settled * _emf_bytes(run) + u.deliveries * LAMBDA_PLATFORM_BYTES
    return u


# -- pricing -----------------------------------------------------------------------


def price(
    usage: Usage, memory_mb: int = DEFAULT_MEMORY_MB, prices: Prices = US_EAST_1
) -> list[Line]:
    """The estimate's rows (their costs add up to :func:`total`)."""
    gb_seconds = usage.compute_seconds * memory_mb / 1024
    rows = [
        ("Lambda", "compute", gb_seconds, "GB-s", prices.lambda_gb_second),
        ("Lambda", "requests", usage.deliveries, "requests", prices.lambda_request),
        ("SQS", "requests (64 KiB units)", usage.sqs_requests, "requests", prices.sqs_request),
        ("S3", "PUT requests", usage.s3_puts, "requests", prices.s3_put),
        ("S3", "GET requests", usage.s3_gets, "requests", prices.s3_get),
        ("S3", "storage, one month", usage.s3_bytes / GB, "GB-month", prices.s3_gb_month),
        ("DynamoDB", "write request units", usage.dynamodb_wru, "WRU", prices.dynamodb_write_unit),
        ("DynamoDB", "read request units", usage.dynamodb_rru, "RRU", prices.dynamodb_read_unit),
        ("CloudWatch", "log ingestion", usage.log_bytes / GB, "GB", prices.log_ingest_gb),
    ]
    return [Line(s, item, q, unit, p, q * p) for s, item, q, unit, p in rows]


def total(lines: Iterable[Line]) -> float:
    """The estimate's total (USD)."""
    return sum(line.cost for line in lines)


def estimate(
    run: RunRecord,
    tasks: Sequence[TaskRecord],
    memory_mb: int = DEFAULT_MEMORY_MB,
    prices: Prices = US_EAST_1,
) -> dict[str, object]:
    """The whole estimate as JSON-ready data (``fanout cost --json``)."""
    usage = measure(run, tasks)
    lines = price(usage, memory_mb, prices)
    return {
        "run_id": run.run_id,
        "region": REGION,
        "prices_as_of": PRICES_AS_OF,
        "memory_mb": memory_mb,
        "usage": {
            **asdict(usage),
            "compute_seconds": round(usage.compute_seconds, 3),
            "sqs_requests": usage.sqs_requests,
        },
        "lines": [asdict(line) for line in lines],
        "total_usd": total(lines),
        "records": run.records,
    }
