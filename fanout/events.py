"""Run events: what happened to a run, told to whoever listens.

The runner publishes a small JSON object at three points:

- ``run.finished``: the run was finalized (``state`` succeeded, failed or
  stopped; ``records``, ``files`` (a count), ``dead_chunks`` (a count),
  ``manifest`` (its store key), ``stop_reason``);
- ``chunk.dead``: a chunk was dead-lettered (``chunk_id``, ``seq``, ``error``);
- ``run.stopped``: a runaway bound stopped the run (``reason``, ``chunk_id``).

Every event has ``type``, ``run_id`` and ``time`` (epoch seconds). Events are
notifications, not the record: the ledger and the manifest are. They are sent
at most once and may be lost (a publish that fails is logged and dropped, a
worker that dies between the ledger write and the publish sends nothing), and
``run.finished`` may, rarely, come twice if a stale finalizer is taken over.

A sink that raises never fails a chunk: :func:`emit` logs and goes on, as
dramatiq does with middleware errors.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

from fanout.backends.base import Backend

log = logging.getLogger("fanout.events")


class EventSink(Protocol):
    """Where run events go."""

    def publish(self, event: dict[str, Any]) -> None:
        """Send one event (a JSON-serializable dict with a ``type``)."""
        ...


class NoEvents:
    """The default sink: events go nowhere."""

    def publish(self, event: dict[str, Any]) -> None:
        """Drop the event."""


class SnsEvents:
    """Publishes each event as JSON to ``settings.events_topic`` on SNS.

    The event's type is also a message attribute (``type``), so subscribers can
    filter with an SNS filter policy instead of receiving everything.
    """

    def __init__(self, settings: Any, sns: Any = None) -> None:
        # ``settings`` is an AwsSettings; typed loosely so that this module does
        # not import the AWS backend (and boto3) for the local backends.
        if not settings.events_topic:
            raise ValueError("SnsEvents needs AwsSettings.events_topic")
        self.settings = settings
        self._sns = sns
        self._arn: str | None = None
        self._lock = threading.Lock()

    def _target(self) -> tuple[Any, str]:
        # Resolved on first use, not when the runner is built: a runner built
        # only to finalize (``coordinator.recover``) may never publish.
        with self._lock:
            if self._sns is None:
                from fanout.backends.aws.clients import client

                self._sns = client("sns", self.settings)
            if self._arn is None:
                from fanout.backends.aws.queue import topic_arn

                self._arn = topic_arn(self._sns, self.settings.events_topic)
            return self._sns, self._arn

    def publish(self, event: dict[str, Any]) -> None:
        """Publish ``event`` to the events topic (``Publish``; botocore retries)."""
        sns, arn = self._target()
        sns.publish(
            TopicArn=arn,
            Message=json.dumps(event, default=str),
            MessageAttributes={
                "type": {"DataType": "String", "StringValue": str(event.get("type", ""))}
            },
        )


def events_for(backend: Backend) -> EventSink:
    """The sink a runner on ``backend`` uses by default: :class:`SnsEvents` on
    the AWS backend with an events topic, :class:`NoEvents` otherwise."""
    if backend.name == "aws":
        # The AWS backend's settings ride on its queue (``open_aws``); reading
        # them there keeps ``Backend`` and the callers that build runners as they are.
        settings = getattr(backend.queue, "settings", None)
        if settings is not None and getattr(settings, "events_topic", None):
            return SnsEvents(settings)
    return NoEvents()


def emit(sink: EventSink, type_: str, run_id: str, **fields: Any) -> None:
    """Publish one event to ``sink``; a failure is logged, never raised."""
    event = {"type": type_, "run_id": run_id, "time": time.time(), **fields}
    try:
        sink.publish(event)
    except Exception:
        log.exception("could not publish event %s of run %s", type_, run_id)
