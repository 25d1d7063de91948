"""Message bodies SQS accepts, whatever text a job puts in its payloads,
cursors or params."""

from __future__ import annotations

import json

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, RunState
from support.helpers import JOBS, drain

ODD_CHARS = str(JOBS / "odd_chars.py")


def test_characters_sqs_refuses_travel_escaped(aws: Backend) -> None:
    # U+FFFE and U+FFFF are valid Unicode (and JSON) that SQS refuses raw in a body.
    text = "a\ufffeb\uffffc"
    run_id = coordinator.submit(aws, ODD_CHARS, {"text": text}).run_id
    run = drain(aws, run_id, chunk_timeout=5, limit=60)
    assert run.state == RunState.SUCCEEDED, run
    got = sorted(r["text"] for r in coordinator.committed_records(aws, run_id))
    assert got == sorted([text, text + "\uffff", text + "\uffff\ufffe"])


def test_the_queue_escapes_them_in_a_json_body_and_refuses_them_in_another(aws: Backend) -> None:
    # A task registered before the encoders escaped them, re-sent by the sweep.
    body = '{"v":1,"run_id":"r","chunk_id":"0","payload":"x\ufffe\uffff"}'
    aws.queue.send([body])
    (delivery,) = aws.queue.receive(1, 30)
    assert json.loads(delivery.body) == json.loads(body)
    with pytest.raises(ValueError, match="refuses"):
        aws.queue.send(["not json \uffff"])
