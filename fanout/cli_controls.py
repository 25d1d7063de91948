"""The run control commands: ``fanout cancel RUN``, ``fanout pause RUN`` and
``fanout resume RUN``, and the lines ``fanout status`` and ``fanout run`` print
of a run: its progress, its summary and its controls.

Registered on the group by :mod:`fanout.cli`; shared helpers come from
:mod:`fanout.cli_common`. Each command is idempotent (exit 0 whether or not it
changed anything); an unknown run id is one line and exit 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from fanout import control_ops
from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunRecord, RunState
from fanout.cli_common import RUN_ID, counted, group_backend, human
from fanout.controls import stop_line
from fanout.limits import RunKind, kind_of

if TYPE_CHECKING:
    from fanout.coordinator import Status


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.pass_context
def cancel(ctx: click.Context, run_id: str) -> None:
    """Cancel RUN: queued chunks at once, running ones at their next checkpoint."""
    click.echo(control_ops.cancel(group_backend(ctx), run_id).message)


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.pass_context
def pause(ctx: click.Context, run_id: str) -> None:
    """Pause RUN: no new chunk of it starts until `fanout resume RUN`."""
    click.echo(control_ops.pause(group_backend(ctx), run_id).message)


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.pass_context
def resume(ctx: click.Context, run_id: str) -> None:
    """Resume a paused RUN from its checkpoints."""
    click.echo(control_ops.resume(group_backend(ctx), run_id).message)


COMMANDS = (cancel, pause, resume)


def status_fields(backend: Backend, run: RunRecord, tasks: dict[str, int]) -> dict[str, Any]:
    """The ``controls`` object of ``fanout status --json``."""
    return control_ops.control_info(backend, run, tasks)


def status_line(fields: dict[str, Any]) -> str:
    """What ``fanout status`` prints of the run's controls (``status_fields``)."""
    return control_ops.control_line(fields)


def summary_lines(run: RunRecord) -> list[str]:
    """What ``fanout run`` adds to its summary for a run the controls ended."""
    if run.state == RunState.SUCCEEDED_WITH_FAILURES:
        dead = counted(run.tasks_dead, "dead chunk")
        return [f"succeeded with {dead}, within the tolerated failures"]
    if run.tasks_cancelled and run.stop_reason:
        return [f"{counted(run.tasks_cancelled, 'chunk')} cancelled"]
    return []


def dead_lines(run: RunRecord, dead: int) -> list[str]:
    """What ``fanout run`` says of a run's ``dead`` chunks: where to read why,
    what to do; for a failed crawl, how to accept pages a site cannot serve
    (fanout.crawl.givenup: some sites always have a few)."""
    if not dead:
        return []
    lines = [
        f"{counted(dead, 'dead chunk')}: see `fanout failed {run.run_id}`,"
        f" fix the cause (the job, its input, the site), then `fanout replay {run.run_id}`"
    ]
    if kind_of(run.settings) is RunKind.CRAWL and run.state is RunState.FAILED:
        lines.append(
            "pages a site cannot serve can be accepted: run with"
            " -S tolerated_failures=N (or tolerated_failure_percent=P)"
        )
    return lines


def progress_line(status: Status, state: str | None = None) -> str:
    """The line ``fanout run`` redraws as its run goes: ``state`` is what to
    show for the run's (paused rather than running, for one). From the run's
    counters only: cheap enough to print twice a second."""
    r = status.run
    # Cancelled chunks did not run: named apart, not counted as finished work.
    cancelled = f"{r.tasks_cancelled} cancelled, " if r.tasks_cancelled else ""
    return (
        f"{r.run_id}  {state or r.state.value}  chunks {r.tasks_done + r.tasks_dead}"
        f"/{r.tasks_total} ({r.tasks_dead} dead, {cancelled}{r.retries} retries)"
        f"  records {r.records:,}  {human(status.rate)}/s  {status.elapsed:.1f}s"
    )


def run_summary(status: Status, backend: Backend) -> str:
    """What ``fanout run`` prints when its run ended."""
    r = status.run
    lines = [
        f"run {r.run_id} {r.state.value}: {r.records:,} records, {r.bytes:,} bytes"
        f" from {counted(status.tasks['done'], 'chunk')} in {status.elapsed:.2f}s"
        f" ({human(status.rate)} records/s)"
    ]
    if r.stop_reason:
        lines.append(stop_line(r.stop_reason))
    lines += summary_lines(r)  # run controls: cancelled count, tolerated failures
    lines += dead_lines(r, status.tasks["dead"])
    if r.manifest_key and r.state in TERMINAL_RUN_STATES:
        lines.append(f"manifest: {backend.store.url(r.manifest_key)}")
    return "\n".join(lines)
