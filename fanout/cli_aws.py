"""The AWS commands. ``fanout deploy --stage NAME`` packages the code and
creates or updates the full stack (the function, its roles and event source);
``fanout aws create|destroy --stage NAME`` makes a stage's resources without
CloudFormation, for emulators (moto, LocalStack) and accounts where a user may
not create stacks."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from fanout.errors import UserError

_STAGE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def _stage(stage: str) -> str:
    if not _STAGE.match(stage):
        raise UserError(
            f"stage {stage!r}: use 1 to 31 lowercase letters, digits or '-' (it names a bucket)"
        )
    return stage


def _not_a_stack(settings: Any, stage: str, instead: str) -> None:
    """:class:`UserError` if STAGE is a CloudFormation stack (``fanout deploy``):
    its resources share the names ``fanout aws`` gives, and ``create`` would
    set its own attributes and queue policy over the stack's (a visibility
    timeout below the function's, the TLS-only denies gone)."""
    from fanout.backends.aws.stack import stack_name, stack_outputs

    if stack_outputs(settings, stage) is not None:
        raise UserError(f"stage {stage} is the CloudFormation stack {stack_name(stage)}: {instead}")


@click.group()
def aws() -> None:
    """Create or remove a stage's resources without CloudFormation."""


@aws.command()
@click.option("--stage", required=True, help="The stage (names every resource).")
def create(stage: str) -> None:
    """Create the queue (and its DLQ), bucket, table, events topic and schedule
    group of STAGE, named as the CLI looks for them (idempotent)."""
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.clients import client
    from fanout.backends.aws.resources import create_resources
    from fanout.schedules.aws import ensure_group, group_name

    stage = _stage(stage)
    settings = AwsSettings.from_env(stage)
    _not_a_stack(settings, stage, "update the stack (fanout deploy --stage ...)")
    topic = settings.events_topic or f"fanout-{stage}-run-events"
    made = create_resources(replace(settings, events_topic=topic))
    group = group_name(stage)
    ensure_group(client("scheduler", settings), group)
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
    from fanout.backends.aws.stack import stack_name
    from fanout.backends.aws.teardown import destroy_resources
    from fanout.schedules.aws import group_name

    stage = _stage(stage)
    settings = AwsSettings.from_env(stage)
    _not_a_stack(
        settings,
        stage,
        f"delete the stack (aws cloudformation delete-stack --stack-name {stack_name(stage)})",
    )
    topic = settings.events_topic or f"fanout-{stage}-run-events"
    lines = destroy_resources(
        settings, group=group_name(stage), events_topic=topic.rsplit(":", 1)[-1], force=force
    )
    for line in lines:
        click.echo(line)


@click.command()
@click.option("--stage", required=True, help="Stage to deploy (stack fanout-STAGE).")
@click.option("--dry-run", is_flag=True, help="Build the zip and print the plan; call no AWS API.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Project directory holding jobs/ and schemas/.",
)
@click.option("--code-bucket", help="Bucket for the code zip (default: fanout-STAGE-code-...).")
@click.option(
    "--parameter", "-p", "parameters", multiple=True, help="Stack parameter KEY=VALUE (repeatable)."
)
@click.option(
    "--layer-zip",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A prebuilt dependency layer zip (python/...) instead of building one with pip.",
)
@click.option(
    "--rebuild-layer", is_flag=True, help="Rebuild the dependency layer even if it is cached."
)
def deploy(
    stage: str,
    dry_run: bool,
    root: Path,
    code_bucket: str | None,
    parameters: tuple[str, ...],
    layer_zip: Path | None,
    rebuild_layer: bool,
) -> None:
    """Package the code and its dependency layer; create or update the AWS stack of STAGE."""
    import tempfile

    # Imported here: deploy pulls in YAML and boto3 that other commands never need.
    from fanout.deploy import build_zip, layer_report, parse_parameters, plan
    from fanout.deploy import deploy as deploy_stack

    stage = _stage(stage)  # before anything is built: it names the stack and its bucket
    overrides = parse_parameters(parameters)
    if dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            size = build_zip(root, Path(tmp) / "fanout.zip").stat().st_size
        click.echo(f"zip: {size} bytes")
        for line in layer_report(root, overrides, layer_zip):
            click.echo(line)
        click.echo(plan(stage, overrides))
        return
    outputs = deploy_stack(
        stage,
        root,
        code_bucket=code_bucket,
        parameters=overrides,
        layer_zip=layer_zip,
        rebuild_layer=rebuild_layer,
        echo=click.echo,
    )
    for key in sorted(outputs):
        click.echo(f"{key}: {outputs[key]}")
