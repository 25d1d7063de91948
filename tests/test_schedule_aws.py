"""Schedules on AWS under moto: ``fanout --backend aws schedule ...`` makes
EventBridge Scheduler schedules targeting the work queue, and the fire message
EventBridge would send runs through the Lambda handler into one run per tick.

moto keeps schedules but never fires them: the tests send the schedule's input,
with EventBridge's placeholder filled in, to the queue themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from click.testing import CliRunner, Result
from moto import mock_aws

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.aws import AwsSettings
from fanout.backends.aws.resources import create_resources
from fanout.backends.base import Backend, RunState
from fanout.cli import main
from fanout.schedules.aws import SCHEDULED_TIME_PLACEHOLDER
from support.helpers import drain, fake_aws
from support.lambda_source import Countdown, sqs_event

REPO = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/fanout-test-scheduler"
GROUP = "fanout-test"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    import fanout.aws_lambda as lambda_mod

    fake_aws(monkeypatch, FANOUT_STAGE="test", FANOUT_AWS_SCHEDULE_ROLE=ROLE)
    monkeypatch.setattr(lambda_mod, "_warm", None)  # a cold container per test
    # Job files are kept relative to the project root, as deployed.
    monkeypatch.chdir(REPO)
    with mock_aws():
        create_resources(AwsSettings.from_env())
        backend = open_backend("aws")
        yield backend
        backend.close()


def at(monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The receiver's clock reads ``when`` (plus a few seconds): a fire message is
    obeyed only for a tick close to now (fanout.schedules.guard)."""
    from datetime import datetime, timedelta

    import fanout.schedules.fire as fire_mod

    now = datetime.fromisoformat(when) + timedelta(seconds=7)
    monkeypatch.setattr(fire_mod, "now_utc", lambda: now)


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["--backend", "aws", *args], prog_name="fanout")


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def eventbridge() -> Any:
    return boto3.client("scheduler")


def deliver(aws: Backend, body: str) -> list[str]:
    """Send ``body`` to the work queue and let the Lambda handler take it, as the
    SQS event source would; returns the ids of the records it reported failed."""
    import fanout.aws_lambda as lambda_mod

    sqs, url = aws.queue.sqs, aws.queue.url  # type: ignore[attr-defined]
    sqs.send_message(QueueUrl=url, MessageBody=body)
    messages = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30, AttributeNames=["All"]
    )["Messages"]
    response = lambda_mod.handler(sqs_event(messages), Countdown(60_000))
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


def fire_message(name: str, when: str) -> str:
    """What EventBridge sends at ``when``: the schedule's input, placeholder filled in."""
    body: str = eventbridge().get_schedule(Name=name, GroupName=GROUP)["Target"]["Input"]
    assert SCHEDULED_TIME_PLACEHOLDER in body
    return body.replace(SCHEDULED_TIME_PLACEHOLDER, when)


def test_add_makes_an_eventbridge_schedule_sending_to_the_work_queue(aws: Backend) -> None:
    out = ok(cli("schedule", "add", "tree", "--cron", "30 9 * * 1-5", "tests/testjobs/tree.py",
                 "-p", "chunks=2", "--overlap", "skip"))  # fmt: skip
    assert "EventBridge schedule fanout-test/tree" in out
    found = eventbridge().get_schedule(Name="tree", GroupName=GROUP)
    # Standard cron in EventBridge's form: MON-FRI are 2-6 there.
    assert found["ScheduleExpression"] == "cron(30 9 ? * 2-6 *)"
    assert found["ScheduleExpressionTimezone"] == "UTC"
    assert found["FlexibleTimeWindow"] == {"Mode": "OFF"}
    assert found["State"] == "ENABLED"
    queue_arn = aws.queue.sqs.get_queue_attributes(  # type: ignore[attr-defined]
        QueueUrl=aws.queue.url,  # type: ignore[attr-defined]
        AttributeNames=["QueueArn"],
    )["Attributes"]["QueueArn"]
    target = found["Target"]
    assert target["Arn"] == queue_arn and target["RoleArn"] == ROLE
    body = json.loads(target["Input"])
    assert body["kind"] == "schedule.fire" and body["schedule"] == "tree"
    assert body["scheduled_time"] == SCHEDULED_TIME_PLACEHOLDER
    assert body["definition"]["job"] == "tests/testjobs/tree.py"  # relative, as deployed
    assert body["definition"]["params"] == {"chunks": 2}


@pytest.mark.parametrize(
    ("start", "first"),
    [
        ("2031-06-01T10:02:30Z", "2031-06-01T10:05:00"),
        # A start on the grid is its first tick (--start is inclusive), not one later.
        ("2031-06-01T10:05:00Z", "2031-06-01T10:05:00"),
    ],
)
def test_rate_starts_on_the_epoch_grid(aws: Backend, start: str, first: str) -> None:
    out = ok(cli("schedule", "add", "r", "--cron", "rate(5 minutes)", "tests/testjobs/tree.py",
                 "--start", start))  # fmt: skip
    assert out.rstrip().endswith(f"first fire {first}Z")
    found = eventbridge().get_schedule(Name="r", GroupName=GROUP)
    assert found["ScheduleExpression"] == "rate(5 minutes)"
    assert found["StartDate"].isoformat() == f"{first}+00:00"


def test_a_start_in_the_past_is_not_shown_as_the_first_fire(aws: Backend) -> None:
    # EventBridge fires from now on: a first fire printed in the past (the
    # start's tick) was a promise it does not keep; `show` said the truth.
    out = ok(cli("schedule", "add", "past", "--cron", "@hourly", "tests/testjobs/tree.py",
                 "--start", "2026-01-01T00:00:00Z"))  # fmt: skip
    first = datetime.fromisoformat(out.rstrip().rsplit("first fire ", 1)[1].replace("Z", "+00:00"))
    assert datetime.now(UTC) <= first <= datetime.now(UTC) + timedelta(hours=1), out


def test_catch_up_is_refused_on_aws_where_it_cannot_apply(aws: Backend) -> None:
    refused = cli("schedule", "add", "cu", "--cron", "@hourly", "tests/testjobs/tree.py",
                  "--catch-up", "all")  # fmt: skip
    assert refused.exit_code == 2 and "--catch-up does not apply on AWS" in refused.stderr
    assert "cu" not in ok(cli("schedule", "list"))


def test_list_show_remove_through_the_same_commands(aws: Backend) -> None:
    ok(cli("schedule", "add", "b", "--cron", "rate(1 hour)", "tests/testjobs/tree.py"))
    ok(cli("schedule", "add", "a", "--cron", "cron(0 12 ? * 6L *)", "tests/testjobs/tree.py"))
    assert [line.split()[0] for line in ok(cli("schedule", "list")).splitlines()] == ["a", "b"]
    shown = ok(cli("schedule", "show", "a", "--after", "2030-01-01T00:00Z"))
    assert "next: 2030-01-25T12:00:00Z, 2030-02-22T12:00:00Z" in shown
    assert ok(cli("schedule", "remove", "a")) == "schedule a removed\n"
    names = [s["Name"] for s in eventbridge().list_schedules(GroupName=GROUP)["Schedules"]]
    assert names == ["b"]
    result = cli("schedule", "remove", "a")
    assert result.exit_code == 2 and "no schedule named 'a'" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--cron", "0 6 1 * 1"], {}, "EventBridge cannot express"),
        (["--cron", "* * * * *"], {"FANOUT_AWS_SCHEDULE_ROLE": ""}, "FANOUT_AWS_SCHEDULE_ROLE"),
    ],
)
def test_refused_before_any_schedule_is_made(
    aws: Backend, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str],
    needle: str,
) -> None:  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = cli("schedule", "add", "x", *args, "tests/testjobs/tree.py")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert eventbridge().list_schedules()["Schedules"] == []


def test_a_fire_message_submits_one_run_per_tick(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(cli("schedule", "add", "tree", "--cron", "*/5 * * * *", "tests/testjobs/tree.py",
           "-p", "chunks=2", "-p", "rows=3"))  # fmt: skip
    at(monkeypatch, "2030-01-01T00:05:00Z")
    body = fire_message("tree", "2030-01-01T00:05:00Z")
    assert deliver(aws, body) == []
    run = aws.ledger.get_run("tree-20300101T0005")
    assert run is not None and run.params["chunks"] == 2
    # EventBridge (or SQS) delivering the same tick again: still one run.
    assert deliver(aws, body) == []
    runs = [r.run_id for r in aws.ledger.list_runs() if r.run_id.startswith("tree-")]
    assert runs == ["tree-20300101T0005"]
    done = drain(aws, "tree-20300101T0005", chunk_timeout=5, limit=60)
    assert done.state == RunState.SUCCEEDED and done.records == 6


def test_the_message_names_the_schedule_and_the_schedule_says_what_runs(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(cli("schedule", "add", "tree", "--cron", "*/5 * * * *", "tests/testjobs/tree.py",
           "-p", "chunks=1"))  # fmt: skip
    at(monkeypatch, "2030-01-01T00:05:00Z")
    forged = json.loads(fire_message("tree", "2030-01-01T00:05:00Z"))
    forged["definition"]["job"] = "jobs/meter_readings.py"
    forged["definition"]["params"] = {"chunks": 50}
    deliver(aws, json.dumps(forged))
    run = aws.ledger.get_run("tree-20300101T0005")
    assert run is not None and run.job_name == "tree" and run.params["chunks"] == 1
    # A schedule that does not exist, or a message that is not one: dropped.
    unknown = json.dumps({**forged, "schedule": "nope"})
    bad = json.dumps({**forged, "extra": 1})
    assert deliver(aws, unknown) == [] and deliver(aws, bad) == []
    assert [r.run_id for r in aws.ledger.list_runs()] == ["tree-20300101T0005"]


def test_overlap_skip_on_aws(aws: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    ok(cli("schedule", "add", "tree", "--cron", "*/5 * * * *", "tests/testjobs/tree.py",
           "--overlap", "skip", "-p", "chunks=1"))  # fmt: skip
    for when in ("2030-01-01T00:00:00Z", "2030-01-01T00:05:00Z"):  # 00:00 is still going
        at(monkeypatch, when)
        deliver(aws, fire_message("tree", when))
    assert aws.ledger.get_run("tree-20300101T0005") is None
    drain(aws, "tree-20300101T0000", chunk_timeout=5, limit=60)
    at(monkeypatch, "2030-01-01T00:10:00Z")
    deliver(aws, fire_message("tree", "2030-01-01T00:10:00Z"))
    # 00:00 had finished, so 00:10 started; 00:05 stays skipped, not postponed.
    runs = {r.run_id: r for r in aws.ledger.list_runs() if r.run_id.startswith("tree-")}
    assert sorted(runs) == ["tree-20300101T0000", "tree-20300101T0010"]
    latest = runs["tree-20300101T0010"]
    assert (latest.job_name, latest.params["chunks"], latest.state) == ("tree", 1, RunState.RUNNING)


def test_schedule_the_pulse_job_on_aws(
    aws: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The base readings: a meter-readings run on AWS (its input read from here).
    base = coordinator.submit(aws, str(REPO / "jobs" / "meter_readings.py"), {}).run_id
    base_run = drain(aws, base, chunk_timeout=10, limit=120)
    assert base_run.state == RunState.SUCCEEDED and base_run.manifest_key
    manifest = aws.store.url(base_run.manifest_key)
    assert manifest.startswith("s3://")
    # One command schedules it; `--at` fires the slot (twice: one run).
    ok(cli("schedule", "add", "pulse", "--cron", "rate(5 minutes)", "jobs/meter_pulse.py",
           "-p", f"base={manifest}", "--start", "2030-01-01T00:00Z"))  # fmt: skip
    for _ in range(2):
        ok(cli("scheduler", "--at", "2030-01-01T00:05:00Z"))
    at(monkeypatch, "2030-01-01T00:05:00Z")  # EventBridge's message too: still one run
    assert deliver(aws, fire_message("pulse", "2030-01-01T00:05:00Z")) == []
    pulses = [r.run_id for r in aws.ledger.list_runs() if r.job_name == "meter-pulse"]
    assert pulses == ["pulse-20300101T0005"]
    run = drain(aws, "pulse-20300101T0005", chunk_timeout=10, limit=120)
    assert run.state == RunState.SUCCEEDED
    assert run.records == base_run.records == 4000
    first = next(coordinator.committed_records(aws, run.run_id))
    assert first["slot"].isoformat() == "2030-01-01T00:05:00+00:00"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"extra": 1}, "extra"),
        ({"scheduled_time": "2030-01-01T00:05:00"}, "scheduled_time"),  # no timezone
        ({"scheduled_time": SCHEDULED_TIME_PLACEHOLDER}, "scheduled_time"),  # not filled in
        ({"schedule": "../x"}, "schedule"),
        ({"v": 2}, "v"),
    ],
)
def test_fire_messages_are_validated_on_receipt(change: dict[str, Any], needle: str) -> None:
    from fanout.messages import MessageError, decode_fire

    good = {"v": 1, "kind": "schedule.fire", "schedule": "pulse",
            "scheduled_time": "2030-01-01T00:05:00Z"}  # fmt: skip
    assert decode_fire(json.dumps(good)).scheduled_time.isoformat() == "2030-01-01T00:05:00+00:00"
    with pytest.raises(MessageError, match=f"invalid schedule fire message: {needle}"):
        decode_fire(json.dumps({**good, **change}))


def test_a_tick_the_invocation_had_no_time_for_comes_back_at_once(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A record not started for lack of time was left to wait out its visibility
    # timeout (at least 6 x the function's timeout when deployed): a tick then
    # came back more than FIRE_LATE late, was refused, and its run never made.
    import fanout.aws_lambda as lambda_mod

    ok(cli("schedule", "add", "tree", "--cron", "*/5 * * * *", "tests/testjobs/tree.py",
           "-p", "chunks=1"))  # fmt: skip
    at(monkeypatch, "2030-01-01T00:05:00Z")
    sqs, url = aws.queue.sqs, aws.queue.url  # type: ignore[attr-defined]
    sqs.send_message(QueueUrl=url, MessageBody=fire_message("tree", "2030-01-01T00:05:00Z"))

    def receive() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=900, AttributeNames=["All"]
        ).get("Messages", [])
        return got

    (tick,) = receive()
    response = lambda_mod.handler(sqs_event([tick]), Countdown(2_500))
    assert response["batchItemFailures"] == [{"itemIdentifier": tick["MessageId"]}]
    (again,) = receive()  # visible again now, not in 15 minutes
    assert lambda_mod.handler(sqs_event([again]), Countdown(60_000))["batchItemFailures"] == []
    assert aws.ledger.get_run("tree-20300101T0005") is not None


def _latest_tick(every: int = 5) -> datetime:
    """The latest tick of ``*/<every> * * * *`` by the real clock (a claim's time
    is the real clock's)."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return now - timedelta(minutes=now.minute % every)


def _claimed_by_a_handler_that_died(aws: Backend, tick: datetime) -> None:
    """What a fire handler killed between its claim and its submit left: the
    tick claimed, never settled, no run (its message stays on the queue)."""
    from fanout.schedules import open_store

    store = open_store(aws)
    assert store.claim_tick("tree", tick)


def _abandoned_late_tick(aws: Backend, monkeypatch: pytest.MonkeyPatch) -> datetime:
    """A schedule whose latest tick a killed handler claimed, and the clock
    15 minutes on (past FIRE_LATE): the tick."""
    tick = _latest_tick()
    ok(cli("schedule", "add", "tree", "--cron", "*/5 * * * *", "tests/testjobs/tree.py",
           "-p", "chunks=1", "--start", f"{tick - timedelta(days=1):%Y-%m-%dT%H:%MZ}"))  # fmt: skip
    _claimed_by_a_handler_that_died(aws, tick)
    at(monkeypatch, (tick + timedelta(minutes=15)).isoformat())
    return tick


def test_a_tick_claimed_by_a_killed_handler_fires_when_redelivered_late(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redelivered after the queue's visibility timeout (6 x the function's
    # timeout when deployed), past FIRE_LATE: the claim shows the tick was on
    # time when it came, so it is finished, not refused as late and lost.
    tick = _abandoned_late_tick(aws, monkeypatch)
    assert deliver(aws, fire_message("tree", tick.strftime("%Y-%m-%dT%H:%M:%SZ"))) == []
    run_id = f"tree-{tick:%Y%m%dT%H%M}"
    assert aws.ledger.get_run(run_id) is not None
    # Settled: a further copy of the message changes nothing.
    assert deliver(aws, fire_message("tree", tick.strftime("%Y-%m-%dT%H:%M:%SZ"))) == []
    assert [r.run_id for r in aws.ledger.list_runs()] == [run_id]


def test_a_late_tick_whose_firing_fails_once_more_is_fired_by_the_next_copy(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler that takes over a killed one's claim (late: past FIRE_LATE)
    # hits an AWS error in its submit. It gave the claim back, so the next
    # copy found no claim and was refused as late: the tick was lost.
    import fanout.schedules.fire as fire_mod

    tick = _abandoned_late_tick(aws, monkeypatch)
    real = fire_mod.submit

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the ledger is unreachable")

    monkeypatch.setattr(fire_mod, "submit", unreachable)
    stamp = tick.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(deliver(aws, fire_message("tree", stamp))) == 1  # failed: comes again
    monkeypatch.setattr(fire_mod, "submit", real)
    assert deliver(aws, fire_message("tree", stamp)) == []
    assert aws.ledger.get_run(f"tree-{tick:%Y%m%dT%H%M}") is not None


def test_the_last_copy_of_a_tick_that_keeps_failing_gives_its_claim_back(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kept after every failure, the abandoned claim outlived the message
    # (dead-lettered at its fifth delivery): an unsettled claim that, under
    # overlap "skip", held back every later tick of the schedule.
    import fanout.aws_lambda as lambda_mod
    import fanout.schedules.fire as fire_mod
    from fanout.failures import POISON_TRIES
    from fanout.schedules import open_store

    tick = _abandoned_late_tick(aws, monkeypatch)

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the ledger is unreachable")

    monkeypatch.setattr(fire_mod, "submit", unreachable)
    sqs, url = aws.queue.sqs, aws.queue.url  # type: ignore[attr-defined]
    sqs.send_message(QueueUrl=url, MessageBody=fire_message("tree", f"{tick:%Y-%m-%dT%H:%M:%SZ}"))
    (message,) = sqs.receive_message(QueueUrl=url, AttributeNames=["All"])["Messages"]
    store = open_store(aws)
    later = datetime.now(UTC) + timedelta(hours=1)
    for delivery in range(POISON_TRIES - 1, POISON_TRIES + 1):
        message["Attributes"]["ApproximateReceiveCount"] = str(delivery)
        lambda_mod.handler(sqs_event([message]), Countdown(60_000))
        kept = store.unsettled_ticks("tree", later) == [tick]
        assert kept is (delivery < POISON_TRIES), delivery  # kept until its last copy


def test_a_copy_of_a_tick_another_handler_is_firing_is_handed_back_not_dropped(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its claim is fresh and unsettled: that handler may be firing it, or may
    # have died. Acknowledged as "claimed elsewhere", the tick was lost when it
    # had died; handed back, the copy comes again and finds out.
    tick = _latest_tick()
    ok(cli("schedule", "add", "tree", "--cron", "*/5 * * * *", "tests/testjobs/tree.py",
           "-p", "chunks=1", "--start", f"{tick - timedelta(days=1):%Y-%m-%dT%H:%MZ}"))  # fmt: skip
    stamp = tick.strftime("%Y-%m-%dT%H:%M:%SZ")
    _claimed_by_a_handler_that_died(aws, tick)
    at(monkeypatch, tick.isoformat())
    assert len(deliver(aws, fire_message("tree", stamp))) == 1  # handed back
    run_id = f"tree-{tick:%Y%m%dT%H%M}"
    assert aws.ledger.get_run(run_id) is None
    at(monkeypatch, (tick + timedelta(minutes=8)).isoformat())  # the claim is abandoned now
    assert deliver(aws, fire_message("tree", stamp)) == []
    assert aws.ledger.get_run(run_id) is not None


def test_finding_unsettled_claims_reads_them_alone(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fire under ``overlap skip`` (and every scheduler pass) asks for the
    schedule's unsettled claims: that read covers the claims not yet settled,
    not every tick the schedule fired in the past week."""
    from fanout.schedules import open_store

    store = open_store(aws)
    base = _latest_tick() - timedelta(days=2)
    for i in range(40):
        assert store.claim_tick("tree", base + timedelta(minutes=5 * i))
        if i != 17:
            store.settle_tick("tree", base + timedelta(minutes=5 * i))
    scanned: list[int] = []
    query = store.dynamodb.query  # type: ignore[attr-defined]

    def counted(**kwargs: Any) -> Any:
        page = query(**kwargs)
        scanned.append(page["ScannedCount"])
        return page

    monkeypatch.setattr(store.dynamodb, "query", counted)  # type: ignore[attr-defined]
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.unsettled_ticks("tree", later) == [base + timedelta(minutes=5 * 17)]
    assert sum(scanned) == 1, scanned
    store.release_tick("tree", base + timedelta(minutes=5 * 17))
    assert store.unsettled_ticks("tree", later) == []


def test_a_long_history_of_claims_is_forgotten_a_few_at_a_claim(aws: Backend) -> None:
    """A schedule that fired for years before claims were forgotten sheds them
    over its next claims, a few each, not all in one handler's time."""
    from fanout.schedules import open_store

    store = open_store(aws)
    today = _latest_tick()
    client, table = aws.ledger.client, aws.ledger.table  # type: ignore[attr-defined]
    for days in range(50, 20, -1):  # 30 old claims, settled, as earlier versions kept them
        tick = int((today - timedelta(days=days)).timestamp())
        client.put_item(
            TableName=table,
            Item={
                "pk": {"S": "SCHEDULE#tree"},
                "sk": {"S": f"TICK#{tick:012d}"},
                "claimed_at": {"N": str(tick)},
                "settled": {"BOOL": True},
            },
        )

    def claims() -> int:
        query = client.query(
            TableName=table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": "SCHEDULE#tree"}},
            ConsistentRead=True,
        )
        return len(query["Items"])

    before = claims()
    assert store.claim_tick("tree", today)
    # 10 forgotten (of the 29 old ones that may go), 2 items for the new claim.
    assert claims() == before - 10 + 2
    assert store.claim_tick("tree", today + timedelta(minutes=5))
    assert store.claim_tick("tree", today + timedelta(minutes=10))
    assert store.last_tick("tree", today - timedelta(days=21)) == today - timedelta(days=21)
    assert store.last_tick("tree", today - timedelta(days=22)) is None


def test_a_claim_cancelled_for_a_conflict_finds_the_winner_or_tries_again(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two claims of one tick at once (a duplicate delivery beside ``scheduler
    --at``) may both be cancelled for a transaction conflict: the loser says
    False once the other claim shows, and tries again while none does."""
    from botocore.exceptions import ClientError

    from fanout.schedules import open_store

    store, other = open_store(aws), open_store(aws)
    transact = store.dynamodb.transact_write_items  # type: ignore[attr-defined]
    conflicts: list[int] = []

    def conflicting(**kwargs: Any) -> Any:
        if len(conflicts) < 2:
            conflicts.append(1)
            if len(conflicts) == 2:  # the other claimant got in this time
                assert other.claim_tick("tree", won)
            error = {
                "Error": {"Code": "TransactionCanceledException", "Message": "conflict"},
                "CancellationReasons": [{"Code": "TransactionConflict"}, {"Code": "None"}],
            }
            raise ClientError(error, "TransactWriteItems")  # type: ignore[arg-type]
        return transact(**kwargs)

    won = _latest_tick() - timedelta(minutes=5)
    monkeypatch.setattr(store.dynamodb, "transact_write_items", conflicting)  # type: ignore[attr-defined]
    assert store.claim_tick("tree", won) is False  # a retry, then the winner's claim
    assert conflicts == [1, 1]
    conflicts.append(1)  # no more conflicts
    assert store.claim_tick("tree", _latest_tick()) is True
