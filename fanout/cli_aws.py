"""``fanout aws create|destroy --stage NAME``: a stage's resources without
CloudFormation, for emulators (moto, LocalStack) and accounts where a user may
not create stacks. ``fanout deploy`` remains the way to a full stack (the
function, its roles and event source)."""

from __future__ import annotations

import re
from dataclasses import replace

import click

from fanout.errors import UserError

_STAGE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def _stage(stage: str) -> str:
    if not _STAGE.match(stage):
        raise UserError(
            f"stage {stage!r}: use 1 to 31 lowercase letters, digits or '-' (it names a bucket)"
        )
    return stage


@click.group()
def aws() -> None:
    """Create or remove a stage's resources without CloudFormation."""


@aws.command()
@click.option("--stage", required=True, help="The stage (names every resource).")
def create(stage: str) -> None:
    """Create the queue (and its DLQ), bucket, table, events topic and schedule
    group of STAGE, named as the CLI looks for them (idempotent)."""
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.clients import client, error_code
    from fanout.backends.aws.resources import create_resources
    from fanout.schedules.aws import group_name

    stage = _stage(stage)
    settings = AwsSettings.from_env(stage)
    topic = settings.events_topic or f"fanout-{stage}-run-events"
    made = create_resources(replace(settings, events_topic=topic))
    group = group_name(stage)
    try:
        client("scheduler", settings).create_schedule_group(Name=group)
    except Exception as exc:
        if error_code(exc) != "ConflictException":  # exists already
            raise
    click.echo(f"queue: {made['queue_url']}")
    click.echo(f"bucket: {made['bucket']}")
    click.echo(f"table: {settings.table}")
    click.echo(f"events topic: {made['events_topic']}")
    click.echo(f"schedule group: {group}")
    click.echo(
        f"use it with: export FANOUT_STAGE={stage} FANOUT_AWS_EVENTS_TOPIC={made['events_topic']}"
    )


@aws.command()
@click.option("--stage", required=True, help="The stage whose resources go.")
@click.option("--force", is_flag=True, help="Also delete a bucket that still holds objects.")
def destroy(stage: str, force: bool) -> None:
    """Delete what `fanout aws create --stage STAGE` made. A bucket that is not
    empty is refused (it holds the runs' output) unless --force."""
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.stack import stack_name, stack_outputs
    from fanout.backends.aws.teardown import destroy_resources
    from fanout.schedules.aws import group_name

    stage = _stage(stage)
    settings = AwsSettings.from_env(stage)
    if stack_outputs(settings, stage) is not None:
        raise UserError(
            f"stage {stage} is the CloudFormation stack {stack_name(stage)}: delete the stack"
            f" (aws cloudformation delete-stack --stack-name {stack_name(stage)})"
        )
    topic = settings.events_topic or f"fanout-{stage}-run-events"
    lines = destroy_resources(
        settings, group=group_name(stage), events_topic=topic.rsplit(":", 1)[-1], force=force
    )
    for line in lines:
        click.echo(line)
