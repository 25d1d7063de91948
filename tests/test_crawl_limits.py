"""Scrapy's ``CLOSESPIDER_*`` limits count the whole crawl, not each chunk
(``fanout/crawl/limits.py``).

Through the CLI: a spider with ``CLOSESPIDER_ITEMCOUNT = 30`` (or
``CLOSESPIDER_PAGECOUNT``) crawls a 200-page site in chunks of 10 pages on 2
workers. Counted per chunk, every chunk stopped at 30 and the next went on:
all 200 pages. Counted run-wide, the run stops near 30, saying why, past it by
at most what the two chunks running at the same time fetch (10 pages each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fanout.crawl.limits import remaining, spent
from support.helpers import JOBS
from support.procs import fanout
from support.sites import HubSite, SiteServer

JOB = str(JOBS / "hard_crawl.py")
LIMIT = 30
PER_CHUNK = 10
WORKERS = 2


@pytest.mark.parametrize(
    ("variable", "reason", "figure"),
    [
        ("HARD_CLOSE_ITEMS", "closespider_itemcount", "records"),
        ("HARD_CLOSE_PAGES", "closespider_pagecount", "pages"),
    ],
)
def test_a_closespider_count_ends_the_run_near_it_not_each_chunk(
    home: Path, variable: str, reason: str, figure: str
) -> None:
    with SiteServer(HubSite(200, delay=0.01)) as server:
        result = fanout(
            home,
            *("run", f"{JOB}:limited", "-p", f"start_url={server.url}"),
            *("-S", f"pages_per_chunk={PER_CHUNK}", "-w", str(WORKERS), "--json"),
            env={variable: str(LIMIT)},
            timeout=180,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    st = json.loads(result.stdout.strip().splitlines()[-1])
    assert st["state"] == "succeeded", st
    assert st["stop_reason"] == f"stopped by the job: the spider closed ({reason})", st
    counted = st["records"] if figure == "records" else st["stats"]["pages"]
    assert LIMIT <= counted <= LIMIT + WORKERS * PER_CHUNK, st


def test_what_is_left_of_each_limit() -> None:
    limits = {
        "CLOSESPIDER_ITEMCOUNT": 100.0,
        "CLOSESPIDER_PAGECOUNT": 50.0,
        "CLOSESPIDER_ERRORCOUNT": 3.0,
        "CLOSESPIDER_TIMEOUT": 60.0,
    }
    stats = {"pages": 20, "callback_errors": 1}
    left = remaining(limits, 40, stats, started=1000.0, now=1015.5)
    assert left == {
        "CLOSESPIDER_ITEMCOUNT": 60.0,
        "CLOSESPIDER_PAGECOUNT": 30.0,
        "CLOSESPIDER_ERRORCOUNT": 2.0,
        "CLOSESPIDER_TIMEOUT": 44.5,
    }
    assert spent(left) is None
    assert spent(remaining(limits, 100, stats, 1000.0, 1001.0)) == "closespider_itemcount"
    assert spent(remaining(limits, 0, {}, 1000.0, 1060.0)) == "closespider_timeout"
    assert spent(remaining(limits, 0, {"callback_errors": 3}, 0.0, 0.0)) == "closespider_errorcount"
