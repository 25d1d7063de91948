"""Chunk metrics, in CloudWatch's embedded metric format (EMF): one JSON line
per settled attempt, printed to stdout, from which CloudWatch Logs extracts the
metrics. No ``PutMetricData`` call, no extra latency, no extra request to pay.

Each attempt that ends (committed, continued, retried, dead) yields one
document: the metrics ``ChunkDuration`` (s), ``Records`` and ``Retries`` (1 for
an attempt that will be retried, else 0, so the metric's Sum counts retries) in
namespace ``fanout`` (``FANOUT_METRICS_NAMESPACE``), dimension ``job``; the run
id, chunk id, seq, attempt and outcome ride along as properties, searchable in
Logs Insights without becoming (billed) dimensions.

Where the lines go (:func:`metrics_for`, ``FANOUT_METRICS``):

- on Lambda with the AWS backend: EMF on stdout, which Lambda ships to
  CloudWatch Logs with the EMF header set, so the metrics appear by themselves;
- ``FANOUT_METRICS=emf``: EMF anywhere, e.g. ``fanout worker --backend aws`` on
  ECS or EC2 beside the CloudWatch agent (plain log shipping does not extract
  EMF, so this is not the default off Lambda: the lines would only be noise on
  stdout, which is also where ``fanout run`` prints its results);
- ``FANOUT_METRICS=off``: nowhere.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from fanout.backends.base import Backend
from fanout.failures import Attempt
from fanout.logs import running_on_lambda

log = logging.getLogger("fanout.metrics")

NAMESPACE = "fanout"
#: The metrics of one document: name and CloudWatch unit.
METRICS = (("ChunkDuration", "Seconds"), ("Records", "Count"), ("Retries", "Count"))


@dataclass(frozen=True, slots=True)
class ChunkMetrics:
    """What one settled attempt measured."""

    job: str
    run_id: str
    chunk_id: str
    seq: int
    attempt: int
    outcome: str  # committed, continued, retried, dead
    duration: float  # seconds from claim to settle
    records: int
    retried: bool  # the attempt failed and the chunk will run again


class MetricsSink(Protocol):
    """Where chunk metrics go."""

    def record(self, metrics: ChunkMetrics) -> None:
        """Take the metrics of one settled attempt."""
        ...


class NoMetrics:
    """The default off Lambda: metrics go nowhere."""

    def record(self, metrics: ChunkMetrics) -> None:
        """Drop them."""


def emf_document(
    m: ChunkMetrics, namespace: str = NAMESPACE, now: float | None = None
) -> dict[str, Any]:
    """The EMF document of one attempt (see the module doc)."""
    stamp = time.time() if now is None else now
    return {
        "_aws": {
            "Timestamp": int(stamp * 1000),  # EMF wants epoch milliseconds
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    "Dimensions": [["job"]],
                    "Metrics": [{"Name": name, "Unit": unit} for name, unit in METRICS],
                }
            ],
        },
        # A dimension value must be a non-empty string.
        "job": m.job or "unknown",
        "ChunkDuration": round(m.duration, 3),
        "Records": m.records,
        "Retries": 1 if m.retried else 0,
        "run_id": m.run_id,
        "chunk_id": m.chunk_id,
        "seq": m.seq,
        "attempt": m.attempt,
        "outcome": m.outcome,
    }


class EmfMetrics:
    """Prints one EMF document per attempt, as one line, to ``stream`` (default:
    whatever ``sys.stdout`` is at the time)."""

    def __init__(self, stream: TextIO | None = None, namespace: str | None = None) -> None:
        self._stream = stream
        self.namespace = namespace or os.environ.get("FANOUT_METRICS_NAMESPACE") or NAMESPACE
        # A line must never interleave with another (Lambda's watchdog thread
        # settles attempts too).
        self._lock = threading.Lock()

    def record(self, metrics: ChunkMetrics) -> None:
        """Print the attempt's document."""
        line = json.dumps(emf_document(metrics, self.namespace), separators=(",", ":"))
        with self._lock:
            stream = self._stream if self._stream is not None else sys.stdout
            stream.write(line + "\n")
            stream.flush()


def metrics_for(backend: Backend) -> MetricsSink:
    """The sink a runner on ``backend`` uses by default (see the module doc)."""
    choice = os.environ.get("FANOUT_METRICS", "").strip().lower()
    if choice == "emf":
        return EmfMetrics()
    if choice in ("off", "none", "0"):
        return NoMetrics()
    if choice:
        log.warning("FANOUT_METRICS=%r is not emf or off; metrics are off", choice)
        return NoMetrics()
    if backend.name == "aws" and running_on_lambda():
        return EmfMetrics()
    return NoMetrics()


def record_attempt(
    sink: MetricsSink,
    job_name: str,
    attempt: Attempt,
    outcome: str,
    took: float | None,
    records: int,
) -> None:
    """Hand one settled attempt to ``sink``; a sink that fails is logged, never
    raised: metrics must not fail a chunk."""
    try:
        sink.record(
            ChunkMetrics(
                job=job_name,
                run_id=attempt.key.run_id,
                chunk_id=attempt.key.chunk_id,
                seq=attempt.key.seq,
                attempt=attempt.attempt,
                outcome=outcome,
                duration=took or 0.0,
                records=records,
                retried=outcome == "retried",
            )
        )
    except Exception:
        log.exception("could not record the metrics of %s", attempt.key)
