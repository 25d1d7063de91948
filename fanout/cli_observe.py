"""The observability commands: ``fanout logs``, ``fanout cost`` and the live
progress bar of ``fanout status --watch``.

Registered on the group by :mod:`fanout.cli`; shared helpers come from
:mod:`fanout.cli_common`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click

from fanout.backends.base import (
    TERMINAL_RUN_STATES,
    Backend,
    Ledger,
    RunRecord,
    RunState,
    TaskRecord,
    TaskState,
)
from fanout.cli_common import RUN_ID, exit_code, group_backend, human, utc_time
from fanout.controls import chunks_ran
from fanout.errors import UserError

if TYPE_CHECKING:  # the coordinator (and pydantic) is imported by the commands that use it
    from fanout.coordinator import Status

#: Width of the progress bar, in characters.
BAR_WIDTH = 24


def _seconds(s: float) -> str:
    """``42.0s``, ``3m05s``, ``2h01m``."""
    if s < 60:
        return f"{s:.1f}s"
    minutes, sec = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# -- status --watch ------------------------------------------------------------------


def progress(st: Status, state: str | None = None) -> dict[str, Any]:
    """What the progress bar shows, from the run's counters only (one read);
    ``state``: the run's state as ``fanout status`` shows it (``paused``,
    ``cancelling``), when the caller read its controls."""
    r = st.run
    finished = r.tasks_done + r.tasks_dead + r.tasks_cancelled
    shown = state or r.state.value
    eta = None
    held = shown in ("paused", "cancelling", "stopping")  # no estimate while held
    if r.state not in TERMINAL_RUN_STATES and not held and 0 < finished < r.tasks_total:
        # Chunks spawn more chunks, so the total can still grow: an estimate.
        eta = st.elapsed * (r.tasks_total - finished) / finished
    return {
        "run_id": r.run_id,
        "state": shown,
        "finished": finished,
        "total": r.tasks_total,
        "dead": r.tasks_dead,
        "cancelled": r.tasks_cancelled,
        "retries": r.retries,
        "records": r.records,
        "records_per_s": round(st.rate, 1),
        "elapsed_s": round(st.elapsed, 3),
        "eta_s": None if eta is None else round(eta, 1),
    }


def progress_bar(st: Status, state: str | None = None) -> str:
    """One line: ``[#####-----]  40% chunks 4/10 ...  ETA ~3.0s`` (or the state)."""
    p = progress(st, state)
    ran = chunks_ran(st.run)  # (the cancelled ones are named beside them)
    frac = ran / p["total"] if p["total"] else 0.0
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    tail = f"ETA ~{_seconds(p['eta_s'])}" if p["eta_s"] is not None else p["state"]
    ended = [f"{p[k]} {k}" for k in ("dead", "cancelled") if p[k]]
    notes = f" ({', '.join(ended)})" if ended else ""
    return (
        f"[{bar}] {frac:4.0%}  chunks {ran:,}/{p['total']:,}{notes}"
        f"  records {p['records']:,}  {human(p['records_per_s'])}/s"
        f"  {_seconds(p['elapsed_s'])}  {tail}"
    )


def watch_run(
    backend: Backend,
    run_id: str,
    interval: float,
    as_json: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the progress bar every ``interval`` seconds until the run ends (a
    line per interval without a terminal; a JSON object per interval with
    ``as_json``). Returns the exit code: 0 if the run succeeded, else 1."""
    from fanout import coordinator

    tty = sys.stdout.isatty() and not as_json
    while True:
        st, shown = coordinator.live_status(backend, coordinator.get_run(backend, run_id))
        if as_json:
            click.echo(json.dumps(progress(st, shown)))
        elif tty:
            click.echo("\r" + progress_bar(st, shown).ljust(100), nl=False)
        else:
            click.echo(progress_bar(st, shown))
        if st.run.state in TERMINAL_RUN_STATES:
            break
        sleep(interval)
    if tty:
        click.echo("")
    if not as_json:
        # Once, at the end: timeouts are never silent (this reads every task).
        full = coordinator.status(backend, run_id)
        if full.timed_out or full.crashed:
            click.echo(failures_line(full))
    return exit_code(st.run)


def failures_line(st: Status) -> str:
    """``2 chunk attempts timed out (last: 0/3 seq 1, attempt 2, from cursor 1200); 1 crashed``."""
    parts = []
    if st.timed_out:
        plural = "attempt" if st.timed_out == 1 else "attempts"
        text = f"{st.timed_out} chunk {plural} timed out"
        last = st.last_timeout
        if last:
            seq = f" seq {last['seq']}" if last["seq"] else ""
            cursor = last["cursor"]
            start = f"cursor {json.dumps(cursor)}" if cursor is not None else "the chunk's start"
            text += f" (last: {last['chunk_id']}{seq}, attempt {last['attempt']}, from {start})"
        parts.append(text)
    if st.crashed:
        verb = "attempt" if st.crashed == 1 else "attempts"
        parts.append(f"{st.crashed} chunk {verb} crashed (worker died or lease expired)")
    return "; ".join(parts)


# -- fanout logs ---------------------------------------------------------------------


def chunk_events(tasks: list[TaskRecord]) -> list[dict[str, Any]]:
    """Every history event of ``tasks``, oldest first. An attempt whose duration
    is known also gets its ``claimed`` event (at the end less the duration)."""
    rows: list[tuple[float, int, dict[str, Any]]] = []
    n = 0
    for t in tasks:
        for event in t.history:
            stamp = event.get("at")
            at = float(stamp) if isinstance(stamp, int | float) else 0.0
            row: dict[str, Any] = {
                "at": at,
                "chunk_id": t.chunk_id,
                "seq": t.seq,
                "attempt": event.get("attempt"),
                "outcome": event.get("outcome"),
            }
            row.update((k, v) for k, v in event.items() if k not in row)
            if event.get("outcome") == "committed" and t.output is not None:
                row["bytes"] = t.output.bytes
            took = event.get("duration_s")
            if isinstance(took, int | float):
                began = round(at - float(took), 3)
                claimed = {**row, "at": began, "outcome": "claimed"}
                claimed = {k: claimed[k] for k in ("at", "chunk_id", "seq", "attempt", "outcome")}
                rows.append((began, n, claimed))
                n += 1
            rows.append((at, n, row))
            n += 1
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def _details(row: dict[str, Any]) -> str:
    parts = []
    if "records" in row:
        parts.append(f"{row['records']:,} records")
    if "bytes" in row:
        parts.append(f"{row['bytes']:,} bytes")
    if "duration_s" in row:
        parts.append(f"in {row['duration_s']:.3f}s")
    if "error" in row:
        parts.append(str(row["error"]))
    return ", ".join(parts)


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.option("--chunk", metavar="ID", help="Only this chunk (every slice of it).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.pass_context
def logs(ctx: click.Context, run_id: str, chunk: str | None, as_json: bool) -> None:
    """RUN's chunk events, oldest first: time, chunk, seq, attempt, outcome, details."""
    from fanout import coordinator

    backend = group_backend(ctx)
    coordinator.get_run(backend, run_id)
    tasks = backend.ledger.list_tasks(run_id)
    if chunk is not None:
        tasks = [t for t in tasks if t.chunk_id == chunk]
        if not tasks:
            raise UserError(f"run {run_id} has no chunk {chunk!r} (see `fanout logs {run_id}`)")
    rows = chunk_events(tasks)
    if as_json:
        for row in rows:
            click.echo(json.dumps({"run_id": run_id, **row}))
        return
    width = max([len("chunk")] + [len(r["chunk_id"]) for r in rows])
    head = f"{'time (UTC)':<24}  {'chunk':<{width}}  {'seq':>3}  {'att':>3}  {'outcome':<10}"
    head += "  details"
    click.echo(head)
    for r in rows:
        click.echo(
            f"{utc_time(r['at'], millis=True):<24}  {r['chunk_id']:<{width}}  {r['seq']:>3}"
            f"  {r['attempt'] if r['attempt'] is not None else '-':>3}"
            f"  {r['outcome']:<10}  {_details(r)}".rstrip()
        )


# -- fanout cost ---------------------------------------------------------------------


def _plain(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, never in scientific notation."""
    if x == 0:
        return "0"
    return format(Decimal(f"{x:.{digits}g}"), "f")


def _quantity(q: float, unit: str) -> str:
    if unit in ("GB-s", "GB-month", "GB"):
        return f"{_plain(q, 4)} {unit}"
    return f"{int(q):,}"


def _unit_price(p: float, unit: str) -> str:
    if unit in ("requests", "WRU", "RRU"):
        return f"${p * 1e6:.3f}".rstrip("0").rstrip(".") + f" per M {unit}"
    return f"${_plain(p, 6)} per {unit}"


def _usd(x: float) -> str:
    """Dollars: cents from $1 up, else three significant digits (a run is cheap)."""
    return f"${x:,.2f}" if x >= 1 else f"${_plain(x)}"


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.option(
    "--memory",
    "memory_mb",
    type=click.IntRange(128, 10240),
    default=1024,
    show_default=True,
    help="Lambda memory (MB) to price the measured chunk time at.",
)
@click.option("--json", "as_json", is_flag=True, help="The estimate as one JSON object.")
@click.pass_context
def cost(ctx: click.Context, run_id: str, memory_mb: int, as_json: bool) -> None:
    """Estimate what RUN would cost on AWS, from its own measured figures."""
    from fanout import coordinator
    from fanout import cost as costs

    backend = group_backend(ctx)
    run = coordinator.get_run(backend, run_id)
    estimate = costs.estimate(run, backend.ledger.list_tasks(run_id), memory_mb)
    if as_json:
        click.echo(json.dumps(estimate))
        return
    usage: dict[str, Any] = estimate["usage"]  # type: ignore[assignment]
    lines: list[dict[str, Any]] = estimate["lines"]  # type: ignore[assignment]
    click.echo(
        f"run {run_id}: estimated AWS cost ({costs.REGION} list prices of"
        f" {costs.PRICES_AS_OF}, Lambda at {memory_mb} MB)"
    )
    header = f"{'service':<11} {'item':<24} {'quantity':>20}  {'unit price':<28} {'cost':>12}"
    click.echo(header)
    for line in lines:
        click.echo(
            f"{line['service']:<11} {line['item']:<24}"
            f" {_quantity(line['quantity'], line['unit']):>20}"
            f"  {_unit_price(line['unit_price'], line['unit']):<28} {_usd(line['cost']):>12}"
        )
    total = float(estimate["total_usd"])  # type: ignore[arg-type]
    click.echo(f"{'total':<11} {'':<24} {'':>20}  {'':<28} {_usd(total):>12}")
    if run.records:
        click.echo(f"per million records: {_usd(total / run.records * 1e6)}")
    unmeasured = usage["attempts"] - usage["measured_attempts"]
    click.echo(
        f"measured: {usage['attempts']:,} attempts, {usage['compute_seconds']:.3f}s of chunk time"
        + (f" ({unmeasured:,} unmeasured, priced at the mean)" if unmeasured > 0 else "")
        + f", {usage['deliveries']:,} deliveries, {usage['sqs_sends']:,} sends"
    )
    click.echo("not counted: the job's own S3 reads, data transfer, free tiers, idle queue polling")


#: Domains ``fanout status`` lists one by one (the busiest); the rest are summed.
DOMAINS_SHOWN = 10


def crawl_lines(
    stats: dict[str, int], pending_requests: int, backoffs: dict[str, float] | None = None
) -> list[str]:
    """A crawl's figures for ``fanout status``: totals, HTTP statuses, ledger
    calls per page, and per domain its pages, statuses, 429/503 answers and
    the back-off it is under now (``backoffs``: seconds left, per domain)."""
    backoffs = backoffs or {}
    domains: dict[str, dict[str, int]] = {}
    for key in [k for k in stats if k.startswith("domain/")]:
        domain, _, what = key[len("domain/") :].partition("/")
        domains.setdefault(domain, {})[what] = stats.pop(key)
    statuses = {k[len("status/") :]: stats.pop(k) for k in sorted(stats) if k.startswith("status/")}
    stats["pending requests"] = pending_requests
    lines = ["crawl: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in stats.items())]
    if statuses:
        lines.append("http: " + ", ".join(f"{k}: {v:,}" for k, v in statuses.items()))
    pages = stats.get("pages", 0)
    if pages:
        calls = stats.get("ledger_claim_calls", 0) + stats.get("ledger_lease_calls", 0)
        lines.append(f"ledger: {calls / pages:.2f} calls a page")
    for domain in backoffs:
        domains.setdefault(domain, {})
    # Backed-off domains first: what a user watching a throttled crawl looks for.
    busiest = sorted(
        domains.items(), key=lambda d: (d[0] not in backoffs, -d[1].get("pages", 0), d[0])
    )
    for domain, figures in busiest[:DOMAINS_SHOWN]:
        codes = ", ".join(
            f"{k[len('status/') :]}: {v:,}" for k, v in sorted(figures.items()) if "/" in k
        )
        throttled = figures.get("throttled", 0)
        lines.append(
            f"  {domain}: pages {figures.get('pages', 0):,}"
            + (f" ({codes})" if codes else "")
            + (f", throttled {throttled:,}" if throttled else "")
            + (f", backed off {backoffs[domain]:,.1f}s more" if domain in backoffs else "")
        )
    if len(busiest) > DOMAINS_SHOWN:
        rest = busiest[DOMAINS_SHOWN:]
        lines.append(
            f"  and {len(rest):,} more domains: pages {sum(f.get('pages', 0) for _, f in rest):,}"
        )
    return lines


@click.command("dead-letters")
@click.option("-n", "limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
@click.option("--body", "show_body", is_flag=True, help="Also print each message body.")
@click.pass_context
def dead_letters(ctx: click.Context, limit: int, as_json: bool, show_body: bool) -> None:
    """Messages that were dropped or failed every delivery, with the reason
    (a dead *chunk* is listed by ``fanout failed RUN`` instead)."""
    from fanout.failures import list_messages

    backend = group_backend(ctx)
    letters = list_messages(backend.store, limit)
    for letter in letters:
        if as_json:
            click.echo(json.dumps({k: v for k, v in letter.items() if k != "traceback"}))
            continue
        when = utc_time(float(letter.get("at", 0.0)))
        # Failures are counted for chunk messages (letters before 2026-12-07: none).
        failed, delivered = letter.get("failures"), letter.get("deliveries") or 1
        if failed:
            how = f"after {failed} failed deliveries"
        else:
            how = f"after {delivered} deliveries" if delivered > 1 else "dropped at once"
        click.echo(f"{when}  message {letter.get('message_id')}  {how}: {letter.get('reason')}")
        if show_body:
            click.echo(f"    body ({letter.get('body_chars')} chars): {letter.get('body')!r}")
    if not letters and not as_json:
        click.echo("no dead-lettered messages")


@click.command()
@click.option(
    "-n", "--limit", type=click.IntRange(min=1, max=1_000_000), default=20, show_default=True
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def runs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent runs, newest first."""
    ledger = group_backend(ctx).ledger
    records = ledger.list_runs(limit=limit)
    # As `fanout status` shows it: a running run may be paused, cancelling or
    # stopping (its controls are read for running runs only).
    shown = {r.run_id: _shown_state(ledger, r) for r in records}
    if as_json:
        for r in records:
            click.echo(
                json.dumps(
                    {
                        "run_id": r.run_id,
                        "job": r.job_name,
                        "state": r.state.value,
                        "shown_state": shown[r.run_id],
                        "records": r.records,
                        "created_at": r.created_at,
                    }
                )
            )
        return
    if not records:
        click.echo("no runs yet (start one with `fanout run JOB`)", err=True)
    # As wide as the longest state shown ("succeeded_with_failures" pushed its
    # row's columns out of line).
    width = max([10, *(len(state) for state in shown.values())])
    for r in records:
        when = utc_time(r.created_at)
        state = shown[r.run_id]
        click.echo(f"{r.run_id:<50} {state:<{width}} {r.records:>12,} records  {when}")


def _shown_state(ledger: Ledger, run: RunRecord) -> str:
    """The run's state as ``fanout status`` shows it (:func:`display_state`)."""
    from fanout.backends.runcontrols import controls_of
    from fanout.controls import display_state

    if run.state != RunState.RUNNING:
        return run.state.value
    paused = bool(controls_of(ledger).read_control(run.run_id).get("paused"))
    return display_state(run, paused)


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.option("--traceback", "show_tb", is_flag=True, help="Show each chunk's traceback.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def failed(ctx: click.Context, run_id: str, show_tb: bool, as_json: bool) -> None:
    """Dead chunks of RUN, with their errors and attempt history."""
    from fanout import coordinator

    backend = group_backend(ctx)
    coordinator.get_run(backend, run_id)
    dead = backend.ledger.list_tasks(run_id, (TaskState.DEAD,))
    for t in dead:
        # The cursor this task started from: where a replay resumes.
        cursor = coordinator.checkpoint(backend, t)
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "chunk_id": t.chunk_id,
                        "seq": t.seq,
                        "error": t.error,
                        "timed_out": (t.error or "").startswith("timed out"),
                        "cursor": cursor,
                        "history": t.history,
                        "traceback": t.traceback,
                    }
                )
            )
            continue
        attempts = t.attempt - t.attempt_floor
        plural = "attempt" if attempts == 1 else "attempts"
        click.echo(f"{t.chunk_id} (seq {t.seq}, {attempts} {plural}): {t.error}")
        for event in t.history:
            detail = f": {event['error']}" if "error" in event else ""
            click.echo(f"    attempt {event.get('attempt')}: {event.get('outcome')}{detail}")
        if cursor is not None or (t.error or "").startswith("timed out"):
            shown = json.dumps(cursor)
            if len(shown) > 200:  # a 5 MB cursor was printed whole (--json has it all)
                shown = f"{shown[:200]}... ({len(shown):,} characters)"
            where = f"cursor {shown}" if cursor is not None else "none (first slice)"
            click.echo(f"    last checkpoint: {where}")
        if show_tb and t.traceback:
            click.echo("    " + t.traceback.rstrip().replace("\n", "\n    "))
    if not dead and not as_json:
        click.echo(f"run {run_id} has no dead chunks")
