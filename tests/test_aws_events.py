"""Dispatch through SNS and run events on SNS, on the AWS backend under moto
(in process)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client
from fanout.backends.aws.resources import create_dispatch, create_resources
from fanout.backends.base import Backend, RunState
from fanout.events import events_for
from fanout.runner import Runner
from support.helpers import TREE, drain, fake_aws
from testjobs.tree import Params, expected_items


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fake_aws(
        monkeypatch,
        FANOUT_STAGE="test",
        FANOUT_AWS_DISPATCH_TOPIC="fanout-test-dispatch",
        FANOUT_AWS_EVENTS_TOPIC="fanout-test-events",
    )
    with mock_aws():
        yield


@pytest.fixture
def aws(aws_env: None) -> Iterator[Backend]:
    made = create_resources(AwsSettings.from_env())
    assert str(made["topic"]).endswith(":fanout-test-dispatch")
    backend = open_backend("aws")
    yield backend
    backend.close()


@pytest.fixture
def listener(aws: Backend) -> str:
    """An SQS queue subscribed (raw delivery) to the events topic; its URL."""
    settings = AwsSettings.from_env()
    sqs, sns = client("sqs", settings), client("sns", settings)
    url = sqs.create_queue(QueueName="events-listener")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    topic = sns.create_topic(Name="fanout-test-events")["TopicArn"]
    sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"}
    )
    return str(url)


def _events(url: str) -> list[dict[str, Any]]:
    sqs = client("sqs", AwsSettings.from_env())
    got: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return got
        for m in messages:
            got.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def test_settings_read_the_topics_from_the_environment(aws_env: None) -> None:
    settings = AwsSettings.from_env()
    assert settings.topic == "fanout-test-dispatch"
    assert settings.events_topic == "fanout-test-events"


def test_dispatch_through_sns_keeps_the_raw_body(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue: Any = aws.queue
    assert str(queue.topic_arn).endswith(":fanout-test-dispatch")
    direct: list[int] = []
    send_batch = queue.sqs.send_message_batch

    def spy(**kwargs: Any) -> Any:
        direct.append(len(kwargs["Entries"]))
        return send_batch(**kwargs)

    monkeypatch.setattr(queue.sqs, "send_message_batch", spy)
    bodies = [json.dumps({"n": i, "text": 'é ✓ "quoted"\n'}) for i in range(13)]
    queue.send(bodies)
    assert direct == []  # undelayed: all through SNS (two PublishBatch calls)
    got = {d.body for d in queue.receive(20, 30)}
    assert got == set(bodies)
    queue.send(["later"], delay=1)
    assert direct == [1]  # SNS has no delay: a delayed message goes to SQS


def test_create_dispatch_twice_subscribes_once(aws: Backend) -> None:
    settings = AwsSettings.from_env()
    create_dispatch(settings, aws.queue.url)  # type: ignore[attr-defined]
    sns = client("sns", settings)
    topic = sns.create_topic(Name="fanout-test-dispatch")["TopicArn"]
    subs = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert len(subs) == 1 and subs[0]["Protocol"] == "sqs"


def test_tree_job_with_dispatch_and_run_finished_event(aws: Backend, listener: str) -> None:
    params = {"chunks": 3, "rows": 20, "step": 8, "children": 2, "depth": 1}
    run_id = coordinator.submit(aws, TREE, params).run_id
    run = drain(aws, run_id, chunk_timeout=5, limit=120)
    assert run.state == RunState.SUCCEEDED
    items = Counter(r["item"] for r in coordinator.committed_records(aws, run_id))
    assert set(items) == expected_items(Params(**params)) and max(items.values()) == 1
    (finished,) = [e for e in _events(listener) if e["type"] == "run.finished"]
    manifest = coordinator.read_manifest(aws, run_id)
    assert finished["run_id"] == run_id
    assert finished["state"] == "succeeded"
    assert finished["records"] == manifest["records"] == len(items)
    assert finished["files"] == len(manifest["files"])
    assert finished["manifest"] == f"runs/{run_id}/_manifest.json"
    assert finished["dead_chunks"] == 0


def test_dead_chunk_and_failed_run_events(aws: Backend, listener: str) -> None:
    run_id = coordinator.submit(
        aws,
        TREE,
        {"chunks": 2, "rows": 3, "fail_chunks": [1], "fail_times": 9},
        {"max_attempts": 2},
    ).run_id
    assert drain(aws, run_id, chunk_timeout=5, limit=120).state == RunState.FAILED
    events = _events(listener)
    (dead,) = [e for e in events if e["type"] == "chunk.dead"]
    assert dead["run_id"] == run_id and dead["chunk_id"] == "0/1"
    assert "flaky chunk 1" in dead["error"]
    (finished,) = [e for e in events if e["type"] == "run.finished"]
    assert finished["state"] == "failed" and finished["dead_chunks"] == 1


def test_runaway_bound_publishes_run_stopped(aws: Backend, listener: str) -> None:
    params = {"chunks": 2, "rows": 1, "children": 2, "depth": 3}
    run_id = coordinator.submit(aws, TREE, params, {"max_depth": 1}).run_id
    assert drain(aws, run_id, chunk_timeout=5, limit=120).state == RunState.STOPPED
    events = _events(listener)
    stopped = [e for e in events if e["type"] == "run.stopped"]
    assert stopped and "max_depth" in stopped[0]["reason"]
    (finished,) = [e for e in events if e["type"] == "run.finished"]
    assert finished["state"] == "stopped" and "max_depth" in finished["stop_reason"]


class _Broken:
    def publish(self, event: dict[str, Any]) -> None:
        raise RuntimeError("events are down")


def test_a_failing_event_sink_does_not_fail_the_run(aws: Backend) -> None:
    run_id = coordinator.submit(
        aws,
        TREE,
        {"chunks": 2, "rows": 2, "fail_chunks": [0], "fail_times": 9},
        {"max_attempts": 1},
    ).run_id
    runner = Runner(aws, events=_Broken())
    run = drain(aws, run_id, chunk_timeout=5, limit=120, runner=runner)
    assert run.state == RunState.FAILED and run.outstanding == 0
    assert coordinator.read_manifest(aws, run_id)["state"] == "failed"


def test_events_for_picks_the_sink(aws: Backend, mem: Backend, listener: str) -> None:
    """On AWS with an events topic the default sink, and so a runner's, publishes
    to that topic; on the memory backend events go nowhere (and fail nothing)."""
    events_for(aws).publish({"type": "run.finished", "run_id": "r-1"})
    Runner(aws).events.publish({"type": "chunk.dead", "run_id": "r-2"})
    events_for(mem).publish({"type": "run.finished", "run_id": "r-3"})
    got = sorted((e["type"], e["run_id"]) for e in _events(listener))
    assert got == [("chunk.dead", "r-2"), ("run.finished", "r-1")]
