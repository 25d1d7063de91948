"""The pulse job (jobs/meter_pulse.py): base readings replayed into a 5-minute
slot, idempotent per slot when scheduled."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, RunState
from fanout.cli import main
from fanout.schedules import open_store
from fanout.schedules.fire import fire
from support.helpers import drain

REPO = Path(__file__).resolve().parents[1]
READINGS = str(REPO / "jobs" / "meter_readings.py")
PULSE = str(REPO / "jobs" / "meter_pulse.py")
SLOT = datetime(2030, 1, 1, 0, 5, tzinfo=UTC)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def backend(home: Path) -> Iterator[Backend]:
    opened = open_backend("local", home=home)
    yield opened
    opened.close()


def write_readings(directory: Path) -> int:
    """Two small CSV files of meter readings; returns the row count."""
    directory.mkdir()
    rows = 0
    for f in range(2):
        lines = ["meter_id,read_at,kwh"]
        for i in range(6):
            when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=7 * i, seconds=f)
            lines.append(f"M{i % 3:04d},{when:%Y-%m-%dT%H:%M:%S},{0.1 * (i + 1) + f:.3f}")
            rows += 1
        (directory / f"readings-{f}.csv").write_text("\n".join(lines) + "\n")
    return rows


@pytest.fixture
def base(backend: Backend, tmp_path: Path) -> tuple[str, int]:
    """A succeeded meter-readings run: (its manifest's path, its record count)."""
    rows = write_readings(tmp_path / "readings")
    run = coordinator.submit(backend, READINGS, {"source": str(tmp_path / "readings")})
    done = drain(backend, run.run_id)
    assert done.state == RunState.SUCCEEDED and done.manifest_key
    return backend.store.url(done.manifest_key), rows


def records(backend: Backend, run_id: str) -> list[dict[str, Any]]:
    return sorted(
        coordinator.committed_records(backend, run_id),
        key=lambda r: (r["meter_id"], r["base_read_at"], r["base_kwh"]),
    )


def test_a_slot_fired_twice_writes_its_readings_once(
    home: Path, backend: Backend, base: tuple[str, int]
) -> None:
    manifest, rows = base
    runner = CliRunner()
    added = runner.invoke(
        main,
        ["--home", str(home), "schedule", "add", "pulse", "--cron", "rate(5 minutes)", PULSE,
         "-p", f"base={manifest}", "--start", "2030-01-01T00:00Z", "--overlap", "skip"],
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    # The same slot fired twice by `--at`, then once more directly (as a
    # redelivered EventBridge message would): one run.
    for _ in range(2):
        out = runner.invoke(main, ["--home", str(home), "scheduler", "--at", "2030-01-01T00:05Z"])
        assert out.exit_code == 0, out.output
    store = open_store(backend)
    schedule = store.get("pulse")
    assert schedule is not None
    assert fire(backend, schedule, SLOT, store).outcome == "already fired"
    pulses = [r.run_id for r in backend.ledger.list_runs() if r.job_name == "meter-pulse"]
    assert pulses == ["pulse-20300101T0005"]
    run = drain(backend, "pulse-20300101T0005")
    assert run.state == RunState.SUCCEEDED
    assert run.params["scheduled_time"] == "2030-01-01T00:05:00Z"
    got = records(backend, run.run_id)
    assert len(got) == run.records == rows
    for record in got:
        assert record["slot"] == SLOT
        assert SLOT <= record["read_at"] < SLOT + timedelta(minutes=5)
        # The offset within its own 5 minutes is kept.
        offset = (record["base_read_at"] - datetime(2024, 1, 1, tzinfo=UTC)) % timedelta(minutes=5)
        assert record["read_at"] - SLOT == offset
        assert 0.75 <= record["kwh"] / record["base_kwh"] <= 1.25


def test_output_is_a_function_of_the_slot(backend: Backend, base: tuple[str, int]) -> None:
    manifest, _ = base

    def run(when: str) -> list[dict[str, Any]]:
        params = {"base": manifest, "scheduled_time": when}
        run_id = coordinator.submit(backend, PULSE, params).run_id
        assert drain(backend, run_id).state == RunState.SUCCEEDED
        return records(backend, run_id)

    first = run("2030-01-01T00:05:00Z")
    assert run("2030-01-01T00:09:59Z") == first  # the same slot: the same readings
    later = run("2030-01-01T06:00:00Z")
    assert [r["base_kwh"] for r in later] == [r["base_kwh"] for r in first]
    assert all(math.isclose(a["kwh"], b["kwh"]) is False for a, b in zip(first, later, strict=True))
    # Meters are phase-shifted: in one slot their factors differ.
    factors = {r["meter_id"]: round(r["kwh"] / r["base_kwh"], 9) for r in first}
    assert len(set(factors.values())) == len(factors) == 3


def test_base_may_be_a_directory_of_avro_files(
    backend: Backend, base: tuple[str, int], home: Path
) -> None:
    manifest, rows = base
    data = str(Path(manifest).parent / "data")
    run_id = coordinator.submit(
        backend, PULSE, {"base": data, "scheduled_time": "2030-01-01T00:05:00Z"}
    ).run_id
    assert drain(backend, run_id).records == rows


def test_a_failed_base_run_is_refused(backend: Backend, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bad.csv").write_text("meter_id,read_at,kwh\nM1,yesterday,1\n")
    base = coordinator.submit(
        backend, READINGS, {"source": str(tmp_path / "bad")}, {"max_attempts": 1}
    )
    failed = drain(backend, base.run_id)
    assert failed.state == RunState.FAILED and failed.manifest_key
    run_id = coordinator.submit(
        backend, PULSE, {"base": backend.store.url(failed.manifest_key)}, {"max_attempts": 1}
    ).run_id
    assert drain(backend, run_id).state == RunState.FAILED
    (dead,) = backend.ledger.list_tasks(run_id)
    assert "did not succeed (failed)" in (dead.error or "")


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time is New York's (restored after the test)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        # The test means something only if local time is not UTC here.
        assert datetime(2030, 1, 1).astimezone(UTC).hour == 5
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_naive_scheduled_time_is_utc(
    backend: Backend, base: tuple[str, int], new_york: None
) -> None:
    manifest, rows = base
    params = {"base": manifest, "scheduled_time": "2030-01-01T00:05:00"}  # no timezone
    run_id = coordinator.submit(backend, PULSE, params).run_id
    run = drain(backend, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == rows
    assert {r["slot"] for r in records(backend, run_id)} == {SLOT}  # not 05:05 UTC
    assert run.params["scheduled_time"] == "2030-01-01T00:05:00Z"
