"""A run's kind (etl, crawl) is declared by its job's class and recorded at
submit (issue 11): status reads it instead of guessing from what the tasks
carry, so an ETL job whose payloads hold a ``requests`` list is not taken for
a crawl."""

from __future__ import annotations

import json
from pathlib import Path

from fanout import coordinator
from fanout.backends.base import Backend, NewTask
from fanout.messages import ChunkMessage, encode

#: The test jobs (not imported from the helpers, wherever they live).
JOBS = Path(__file__).resolve().parent / "testjobs"

#: An ETL job with no plan: its one chunk's payload is its params, which hold
#: a list named ``requests`` (HTTP requests it replays, say).
REPLAY_JOB = """
from pydantic import BaseModel
from fanout import Job

class Params(BaseModel):
    requests: list[str]

job = Job("replay", params=Params)

@job.process
def process(payload, ctx):
    return None
"""


def test_an_etl_run_whose_payload_holds_requests_is_not_a_crawl(
    mem: Backend, tmp_path: Path
) -> None:
    path = tmp_path / "replay.py"
    path.write_text(REPLAY_JOB)
    run = coordinator.submit(mem, str(path), {"requests": ["a", "b", "c"]})
    (task,) = mem.ledger.list_tasks(run.run_id)
    assert json.loads(task.message)["payload"] == {"requests": ["a", "b", "c"]}
    status = coordinator.status(mem, run.run_id)
    # Sniffed, the queued chunk's three "requests" counted as a crawl's pending pages.
    assert status.pending_requests == 0
    assert run.settings["kind"] == "etl"
    assert status.to_dict()["kind"] == "etl"


def test_a_crawl_run_is_declared_at_submit_and_counts_its_pending_requests(
    ledger: Backend,
) -> None:
    job = f"{JOBS / 'crawl_process.py'}:books"
    run = coordinator.submit(ledger, job, {"start_url": "http://127.0.0.1:9/"})
    assert run.settings["kind"] == "crawl"
    assert ledger.ledger.get_run(run.run_id).settings["kind"] == "crawl"  # type: ignore[union-attr]
    # Two requests handed on to a child chunk that has not run yet.
    requests = [{"url": f"http://127.0.0.1:9/{i}"} for i in range(2)]
    child = ChunkMessage(run_id=run.run_id, chunk_id="0/0", payload={"requests": requests})
    created = ledger.ledger.register(run.run_id, [NewTask("0/0", 0, 1, encode(child), "0", 0)], 10)
    assert created.created == 1
    status = coordinator.status(ledger, run.run_id)
    assert status.pending_requests == 2
    assert status.to_dict()["kind"] == "crawl"
