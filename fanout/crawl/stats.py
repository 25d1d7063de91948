"""The crawl counters a chunk reports to its parent (``fanout status``), read
from Scrapy's stats collector at the end of the chunk."""

from __future__ import annotations

from typing import Any

from fanout.backends.base import DOMAIN_STATS


def summarize_stats(stats: dict[str, Any]) -> dict[str, int]:
    """The crawl counters fanout keeps per run (``fanout status``)."""
    out: dict[str, int] = {
        "pages": int(stats.get("response_received_count", 0)),
        "duplicates": int(
            stats.get("fanout/dupes_chunk", 0)
            + stats.get("fanout/dupes_run", 0)
            + stats.get("fanout/dupes_copy", 0)
            + stats.get("fanout/dupes_known", 0)
        ),
        "http_retries": int(stats.get("retry/count", 0)),
        "download_errors": int(stats.get("downloader/exception_count", 0)),
        # Requests Scrapy's retry gave up on (each kept: fanout.crawl.givenup).
        "given_up": int(stats.get("fanout/given_up", 0)),
        "throttled": int(stats.get("fanout/throttled", 0)),
        # Connections a site's host refused (or never let happen): held back.
        "unreachable": int(stats.get("fanout/unreachable", 0)),
        "throttle_gave_up": int(stats.get("fanout/throttle_gave_up", 0)),
        "handed_on_in_flight": int(stats.get("fanout/handed_on_in_flight", 0)),
        "new_urls": int(stats.get("fanout/new_urls", 0)),
        "known_taken": int(stats.get("fanout/dupes_known", 0)),
        "ledger_claim_calls": int(stats.get("fanout/ledger_claim_calls", 0)),
        "ledger_fingerprints_asked": int(stats.get("fanout/ledger_claimed_asked", 0)),
        "ledger_lease_calls": int(stats.get("fanout/ledger_lease_calls", 0)),
        "ledger_read_units": int(stats.get("fanout/ledger_read_units", 0)),
        "ledger_write_units": int(stats.get("fanout/ledger_write_units", 0)),
        "robots_from_store": int(stats.get("fanout/robots_from_store", 0)),
        "robots_wait_gave_up": int(stats.get("fanout/robots_wait_gave_up", 0)),
        # robots.txt fetches given a chunk-bounded timeout (politeness.SharedRobotsTxt).
        "robots_bounded": int(stats.get("fanout/robots_bounded", 0)),
        "in_flight_timeouts": int(stats.get("fanout/in_flight_timeouts", 0)),
        "callback_errors": callback_errors(stats),
    }
    prefix = "downloader/response_status_count/"
    for key, value in stats.items():
        if key.startswith(prefix):
            out["status/" + key[len(prefix) :]] = int(value)
        elif key.startswith("fanout/domain/"):
            out[DOMAIN_STATS + key[len("fanout/domain/") :]] = int(value)
    return {k: v for k, v in out.items() if v}


def callback_errors(stats: dict[str, Any]) -> int:
    """Exceptions the spider's callbacks raised. Scrapy counts each one under
    ``spider_exceptions/<its type>`` and, since 2.13, ``spider_exceptions/count``
    too: the total when there is one, else the sum of the types."""
    if "spider_exceptions/count" in stats:
        return int(stats["spider_exceptions/count"])
    return sum(int(v) for k, v in stats.items() if k.startswith("spider_exceptions/"))
