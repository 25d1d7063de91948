"""Finding a stage's resources: the deployed stack's outputs, else the names
``fanout aws create`` gives them.

``fanout deploy`` names the bucket ``fanout-<stage>-store-<account>-<region>``
(bucket names are global), so the CLI cannot guess it from the stage: with
``FANOUT_STAGE`` set, it reads the queue, bucket, table, events topic and
scheduler role from the outputs of the stack ``fanout-<stage>`` and puts them
in the environment (:func:`export_stage`), so that every backend the command
opens, in this process or a worker child, uses them. Explicit ``FANOUT_AWS_*``
variables still win, and when all three names are given no CloudFormation
call is made at all. The Lambda function never looks: its environment names
everything (the template sets it).
"""

from __future__ import annotations

import logging
import os

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client, error_code
from fanout.errors import UserError

log = logging.getLogger(__name__)

#: The variables that name the three resources outright.
EXPLICIT = ("FANOUT_AWS_QUEUE", "FANOUT_AWS_BUCKET", "FANOUT_AWS_TABLE")
#: Errors meaning "the queue does not exist" (SQS's JSON and query protocols).
_NO_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


def stage_of(stage: str | None = None) -> str:
    """``stage``, else ``FANOUT_STAGE``, else ``dev``."""
    return stage or os.environ.get("FANOUT_STAGE") or "dev"


def stack_name(stage: str) -> str:
    """The CloudFormation stack of ``stage`` (``fanout deploy`` creates it)."""
    return f"fanout-{stage}"


def stack_outputs(settings: AwsSettings, stage: str) -> dict[str, str] | None:
    """The outputs of ``stage``'s stack, or None if there is none (or it cannot be
    read: an account where the user may not describe stacks)."""
    try:
        stacks = client("cloudformation", settings).describe_stacks(StackName=stack_name(stage))
    except Exception as exc:
        code = error_code(exc)
        if code == "ValidationError" or code in ("AccessDenied", "AccessDeniedException"):
            log.debug("no readable stack %s: %s", stack_name(stage), exc)
            return None
        raise
    for stack in stacks.get("Stacks", []):
        if str(stack.get("StackStatus", "")).startswith("DELETE"):
            continue
        return {str(o["OutputKey"]): str(o["OutputValue"]) for o in stack.get("Outputs", [])}
    return None


#: The variable each stack output goes to (when not set already).
_EXPORTS = {
    "FANOUT_AWS_QUEUE": "QueueUrl",
    "FANOUT_AWS_BUCKET": "BucketName",
    "FANOUT_AWS_TABLE": "TableName",
    "FANOUT_AWS_EVENTS_TOPIC": "TopicArn",
    "FANOUT_AWS_SCHEDULE_ROLE": "SchedulerRoleArn",
}


def export_stage(stage: str | None = None) -> dict[str, str]:
    """Set the ``FANOUT_AWS_*`` variables not set yet to the outputs of the
    stage's stack, for this process and the processes it starts; returns what
    it set (nothing when there is no stack: the names are then those
    ``fanout aws create`` gives, which ``AwsSettings.from_env`` derives)."""
    stage = stage_of(stage)
    env = os.environ
    if all(env.get(name) for name in EXPLICIT):
        return {}
    outputs = stack_outputs(AwsSettings.from_env(stage), stage)
    if not outputs:
        return {}
    found = {
        name: outputs[key]
        for name, key in _EXPORTS.items()
        if outputs.get(key) and not env.get(name)
    }
    env.update(found)
    return found


def not_deployed(exc: BaseException, stage: str | None = None) -> UserError | None:
    """A one-line :class:`UserError` if ``exc`` says the stage's queue does not
    exist (the stage is neither deployed nor created), else None."""
    if error_code(exc) not in _NO_QUEUE:
        return None
    stage = stage_of(stage)
    return UserError(
        f"stage {stage} is not deployed: no stack {stack_name(stage)} and no queue"
        f" fanout-{stage}-work (deploy it with `fanout deploy --stage {stage}`, create its"
        f" resources with `fanout aws create --stage {stage}`, or set FANOUT_AWS_QUEUE,"
        " FANOUT_AWS_BUCKET and FANOUT_AWS_TABLE)"
    )
