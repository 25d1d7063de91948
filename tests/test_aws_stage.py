"""The AWS CLI finds its stage (issue 10, point 4): after ``fanout deploy``,
``FANOUT_STAGE`` alone leads every ``--backend aws`` command to the stack's
queue, bucket (named with account and region, so not guessable) and table;
``fanout aws create|destroy --stage`` make and remove the same resources
without CloudFormation; a stage that exists neither way is one clear line."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fanout.cli import main
from support.helpers import TREE, drain, fake_aws

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws
    from moto.awslambda.models import LayerVersion

    import fanout.aws_lambda as lambda_mod
    from fanout.backends.aws.clients import clear_cache

    fake_aws(monkeypatch)  # no FANOUT_AWS_* names, and what a command exports is undone
    monkeypatch.delenv("FANOUT_STAGE", raising=False)
    monkeypatch.setattr(lambda_mod, "_warm", None)
    # The same moto gap test_deploy.py works around (a layer's Ref).
    monkeypatch.setattr(
        LayerVersion, "physical_resource_id", property(lambda self: self.arn), raising=False
    )
    clear_cache()
    with mock_aws():
        yield
    clear_cache()


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="fanout")


def test_the_cli_finds_a_deployed_stack_from_fanout_stage_alone(
    moto: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import boto3

    from fanout.backends import open_backend
    from fanout.deploy import deploy

    layer = tmp_path / "layer.zip"
    with zipfile.ZipFile(layer, "w") as archive:
        archive.writestr("python/fakedep/__init__.py", "VALUE = 1\n")
    outputs = deploy("qa", REPO, code_bucket="fanout-code", layer_zip=layer)
    # The template's bucket name carries the account and region: not fanout-qa-store.
    assert outputs["BucketName"] != "fanout-qa-store"
    # `fanout aws create` on the stack's stage set its own queue attributes over
    # the stack's (visibility 30 s, below the function's timeout) and put its
    # policy in place of the stack's TLS-only denies (a black-box helper's find).
    sqs = boto3.client("sqs")

    def queue_attributes() -> dict[str, str]:
        got = sqs.get_queue_attributes(QueueUrl=outputs["QueueUrl"], AttributeNames=["All"])
        return dict(got["Attributes"])

    attributes = queue_attributes()
    for command in ("create", "destroy"):
        refused = cli("aws", command, "--stage", "qa")
        assert refused.exit_code == 2, refused.output
        assert "stage qa is the CloudFormation stack fanout-qa" in refused.output
    assert queue_attributes() == attributes

    monkeypatch.setenv("FANOUT_STAGE", "qa")
    submitted = cli("--backend", "aws", "submit", TREE, "-p", "chunks=2", "-p", "rows=3")
    assert submitted.exit_code == 0, submitted.output
    run_id = submitted.stdout.strip().splitlines()[-1]  # (moto may print a warning first)
    # The run went to the stack's table and its message to the stack's queue.
    item = boto3.client("sqs").receive_message(QueueUrl=outputs["QueueUrl"], VisibilityTimeout=0)
    assert run_id in item["Messages"][0]["Body"]

    backend = open_backend("aws")
    try:
        assert backend.store.bucket == outputs["BucketName"]  # type: ignore[attr-defined]
        assert drain(backend, run_id, chunk_timeout=5, limit=60).records == 6
    finally:
        backend.close()
    listed = cli("--backend", "aws", "cat", run_id)
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    # The stack's output bucket holds the manifest.
    keys = boto3.client("s3").list_objects_v2(Bucket=outputs["BucketName"], Prefix="runs/")
    assert any(o["Key"].endswith("_manifest.json") for o in keys["Contents"])
    # An explicit name still wins over the stack's.
    monkeypatch.setenv("FANOUT_AWS_TABLE", "no-such-table")
    status = cli("--backend", "aws", "status", run_id)
    assert status.exit_code != 0


def test_a_stage_that_is_not_deployed_is_one_clear_line(
    moto: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FANOUT_STAGE", "nowhere")
    result = cli("--backend", "aws", "runs")
    assert result.exit_code == 2
    assert "stage nowhere is not deployed" in result.output
    assert "fanout aws create --stage nowhere" in result.output
    assert "Traceback" not in result.output


def test_aws_create_then_destroy_without_cloudformation(
    moto: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    made = cli("aws", "create", "--stage", "emu")
    assert made.exit_code == 0, made.output
    monkeypatch.setenv("FANOUT_STAGE", "emu")
    # Made again: idempotent, and the stage's schedules are kept (moto replaced
    # the schedule group, and dropped its schedules, when asked to create it).
    monkeypatch.setenv("FANOUT_AWS_SCHEDULE_ROLE", "arn:aws:iam::123456789012:role/s")
    kept = cli("--backend", "aws", "schedule", "add", "kept", TREE, "--cron", "@daily")
    assert kept.exit_code == 0, kept.output
    assert cli("aws", "create", "--stage", "emu").exit_code == 0
    assert "kept" in cli("--backend", "aws", "schedule", "list").stdout
    submitted = cli("--backend", "aws", "submit", TREE, "-p", "chunks=1", "-p", "rows=2")
    assert submitted.exit_code == 0, submitted.output
    run_id = submitted.stdout.strip().splitlines()[-1]  # (moto may print a warning first)
    status = cli("--backend", "aws", "status", run_id, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["run_id"] == run_id

    boto3.client("s3").put_object(Bucket="fanout-emu-store", Key="runs/x", Body=b"data")
    refused = cli("aws", "destroy", "--stage", "emu")
    assert refused.exit_code == 2
    assert "is not empty" in refused.output and "--force" in refused.output
    assert boto3.client("dynamodb").describe_table(TableName="fanout-emu-ledger")  # untouched

    gone = cli("aws", "destroy", "--stage", "emu", "--force")
    assert gone.exit_code == 0, gone.output
    for what in (
        "bucket fanout-emu-store",
        "queue fanout-emu-work",
        "queue fanout-emu-work-dlq",
        "table fanout-emu-ledger",
        "topic fanout-emu-run-events",
        "schedule group fanout-emu",
    ):
        assert f"{what}: deleted" in gone.output, gone.output
    after = cli("--backend", "aws", "runs")
    assert after.exit_code == 2 and "stage emu is not deployed" in after.output


def test_a_dispatch_topic_adds_its_statement_to_the_queue_policy(
    moto: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its statement used to replace the whole policy: an earlier topic's
    # deliveries were refused without a word, and any deny a user added went.
    import boto3

    monkeypatch.setenv("FANOUT_AWS_DISPATCH_TOPIC", "first")
    assert cli("aws", "create", "--stage", "emu").exit_code == 0
    sqs = boto3.client("sqs")
    url = sqs.get_queue_url(QueueName="fanout-emu-work")["QueueUrl"]

    def statements() -> list[dict[str, object]]:
        policy = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])
        return list(json.loads(policy["Attributes"]["Policy"])["Statement"])

    deny = {"Sid": "TLSOnly", "Effect": "Deny", "Principal": "*", "Action": "sqs:*"}
    policy = {"Version": "2012-10-17", "Statement": [*statements(), deny]}
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    monkeypatch.setenv("FANOUT_AWS_DISPATCH_TOPIC", "second")
    assert cli("aws", "create", "--stage", "emu").exit_code == 0
    assert cli("aws", "create", "--stage", "emu").exit_code == 0  # no statement twice
    sids = [st["Sid"] for st in statements()]
    assert sorted(sids) == ["TLSOnly", "fanout-dispatch-first", "fanout-dispatch-second"]
