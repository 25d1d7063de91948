"""Crawl jobs on a hostile site (``tests/support/hardsite.py``), through the CLI as a user
would run them: 2 workers, short chunk timeouts, small chunks, a server whose
listen backlog is 5. What issue 9 demands of a crawl:

* every item exactly once, and no page parsed twice, under Scrapy's own
  retries (500s, download timeouts) and redirects (301/302 chains, a redirect
  source retried first), with links written in several spellings;
* a ``CrawlSpider`` with ``rules`` and a ``SitemapSpider`` (index → sitemaps →
  pages) run unmodified and yield exactly once;
* per-domain politeness holds run-wide, across chunks and workers:
  ``CONCURRENT_REQUESTS_PER_DOMAIN``, ``DOWNLOAD_DELAY``, robots.txt fetched
  once per domain per run, its ``Crawl-delay`` honoured.

A page's request count at the server tells a second parse apart from a
justified second fetch: an item page that never answers 500 must be requested
once; a flaky page exactly once per 500 plus once for its 200. (Redirect
sources are not counted: they are not parsed.)
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from support.hardsite import HOSTS, HardServer, HardSite
from support.helpers import JOBS
from support.procs import fanout, run_id_of, status
from support.sites import Reply

JOB = str(JOBS / "hard_crawl.py")
#: Allowed shortfall of a gap between two request arrivals at the server (s).
#: Scrapy spaces the *sends* of a domain's requests by the delay; at the server
#: a gap comes out shorter by the connection set-up of the earlier request
#: (a new connection queued in a backlog of 5) when the later one reuses a
#: kept-alive connection: 20-30 ms seen on a loaded 2-core machine, the same
#: within one plain Scrapy process. Two chunks crawling a domain at once would
#: show gaps near 0.
GAP_TOLERANCE = 0.05


def crawl(
    home: Path,
    name: str,
    url: str,
    *,
    pages_per_chunk: int,
    chunk_timeout: float = 6,
    workers: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> tuple[str, dict[str, Any]]:
    """``fanout run`` of ``hard_crawl.py:NAME`` on the site at ``url``: (run id, status)."""
    result = fanout(
        home,
        "run",
        f"{JOB}:{name}",
        "-p",
        f"start_url={url}",
        "-w",
        str(workers),
        "--chunk-timeout",
        str(chunk_timeout),
        "-S",
        f"pages_per_chunk={pages_per_chunk}",
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded", st
    return run_id, st


def item_ids(home: Path, run_id: str) -> Counter[str]:
    result = fanout(home, "cat", run_id)
    assert result.returncode == 0, result.stderr
    return Counter(json.loads(line)["id"] for line in result.stdout.splitlines())


def assert_exactly_once(
    home: Path, run_id: str, site: HardSite, server: HardServer, st: dict[str, Any]
) -> None:
    """Every expected item once, nothing else; no item page fetched more often
    than a correct crawl fetches it. Fails with a count and examples of each fault.

    One kind of second fetch is justified: a request still waiting for its
    answer when its chunk's time ran out is handed on to a child chunk (never
    parsed by the first), and the server may have seen the first try. The run
    counts those (``handed_on_in_flight``); extra fetches beyond that count are
    faults."""
    ids = item_ids(home, run_id)
    hits = server.hits
    expected = site.expected_items()
    extra = {k: hits[k] - 1 for k in site.normal_paths if hits[k] > 1}
    extra.update({k: hits[k] - n for k, n in site.flaky_pages.items() if hits[k] > n})
    handed_on = int(st["stats"].get("handed_on_in_flight", 0))
    faults = {
        "items yielded more than once": sorted(i for i, n in ids.items() if n > 1),
        "items missing": sorted(expected - set(ids)),
        "items not on the site": sorted(set(ids) - expected),
        "pages fetched more than once (beyond requests handed on in flight)": sorted(extra)
        if sum(extra.values()) > handed_on
        else [],
        "flaky pages fetched fewer than (500s + 1) times": sorted(
            f"{k}: {hits[k]}" for k, n in site.flaky_pages.items() if hits[k] < n
        ),
    }
    summary = {what: (len(found), found[:5]) for what, found in faults.items() if found}
    assert summary == {}, f"{sum(ids.values())} records for {len(expected)} items: {summary}"


def needs_localhost() -> None:
    if socket.gethostbyname("localhost") != "127.0.0.1":
        pytest.skip("the site's second host name, localhost, is not 127.0.0.1 here")


# -- exactly once, on the hard site -------------------------------------------------


@pytest.mark.slow
def test_tutorial_spider_on_the_hard_site_parses_every_page_once(home: Path) -> None:
    site = HardSite(1200)
    with HardServer(site, backlog=5) as server:
        run_id, st = crawl(home, "tutorial", server.url, pages_per_chunk=60, chunk_timeout=6)
        assert_exactly_once(home, run_id, site, server, st)
    assert st["chunks"]["done"] >= 10, st["chunks"]  # really crossed many chunk boundaries
    assert st["chunks"]["dead"] == 0 and st["retries"] == 0, st
    # The traps were sprung: retried 500s and redirects (a correct crawl follows
    # all of them); a burst of connections to a backlog of 5 is not a download error.
    # (A 500 whose request was handed on in flight is never seen by the crawler.)
    html = b"".join(site.bodies.values()).decode()
    linked = {k for k in site.redirects if f'{k}"' in html or f"{k}#" in html}
    five_hundreds = sum(n - 1 for n in site.flaky_pages.values()) + sum(
        1 for key in linked if site.is_flaky(key)
    )
    seen_500 = st["stats"].get("status/500", 0)
    handed_on = st["stats"].get("handed_on_in_flight", 0)
    assert five_hundreds - handed_on <= seen_500 <= five_hundreds, st["stats"]
    assert st["stats"].get("status/301", 0) > 0 and st["stats"].get("status/302", 0) > 0
    assert st["stats"].get("download_errors", 0) == 0, st["stats"]


@pytest.mark.slow
def test_crawl_spider_with_rules_yields_every_page_once(home: Path) -> None:
    site = HardSite(300)
    with HardServer(site, backlog=5) as server:
        run_id, st = crawl(home, "rules", server.url, pages_per_chunk=25, chunk_timeout=5)
        assert_exactly_once(home, run_id, site, server, st)
    assert st["chunks"]["done"] >= 10, st["chunks"]


@pytest.mark.slow
def test_sitemap_spider_yields_every_listed_page_once(home: Path) -> None:
    site = HardSite(300, sitemaps=6)
    with HardServer(site, backlog=5) as server:
        run_id, st = crawl(home, "sitemap", server.url, pages_per_chunk=25, chunk_timeout=5)
        assert_exactly_once(home, run_id, site, server, st)
        hits = server.hits
    sitemaps = {f"/sitemaps/{i}.xml" for i in range(site.sitemaps)} | {"/sitemap_index.xml"}
    assert {key: hits[key] for key in sitemaps} == dict.fromkeys(sitemaps, 1)
    assert st["chunks"]["done"] >= 10, st["chunks"]


# -- politeness, run-wide ---------------------------------------------------------


def polite_crawl(
    home: Path, server: HardServer, delay: float, per_domain: int
) -> tuple[str, dict[str, Any]]:
    """The ``polite`` spider, 2 workers, chunks of 5 pages that time out at 6 s."""
    env = {"HARD_DELAY": str(delay), "HARD_PER_DOMAIN": str(per_domain)}
    return crawl(home, "polite", server.url, pages_per_chunk=5, chunk_timeout=6, env=env)


@pytest.mark.slow
def test_per_domain_limits_hold_across_chunks_and_workers(home: Path) -> None:
    needs_localhost()
    delay, per_domain = 0.2, 2
    # Replies take longer than the delay, so one process alone keeps 2 requests
    # in flight per domain: more chunks crawling a domain at once would show.
    site = HardSite(40, hosts=2, delay=0.3, traps=False)
    with HardServer(site) as server:
        run_id, st = polite_crawl(home, server, delay, per_domain)
        seen = server.politeness
        gaps = {h: seen.short_gaps(h, delay - GAP_TOLERANCE, skip="/robots.txt") for h in HOSTS}
    assert st["chunks"]["done"] >= 6, st["chunks"]
    for host in HOSTS:
        assert sum(seen.hits[host].values()) > 10, host  # the domain really was crawled
    found: dict[str, dict[str, Any]] = {
        host: {
            "robots.txt fetches": seen.hits[host]["/robots.txt"],
            "most in flight": seen.max_in_flight[host],
            "gaps under the delay": gaps[host][:5],
        }
        for host in HOSTS
    }
    impolite = {
        host: figures
        for host, figures in found.items()
        if figures["robots.txt fetches"] != 1
        or figures["most in flight"] > per_domain
        or figures["gaps under the delay"]
    }
    assert impolite == {}
    assert_exactly_once(home, run_id, site, server, st)
    # fanout status names each domain with its own pages and statuses, which
    # add up to the run's totals and match what the server served.
    shown = fanout(home, "status", run_id)
    assert shown.returncode == 0, shown.stderr
    per_domain = {
        line.split(":")[0].strip(): int(line.split("pages ")[1].split()[0].replace(",", ""))
        for line in shown.stdout.splitlines()
        if line.startswith("  ") and ": pages " in line
    }
    served = {h: sum(seen.hits[h].values()) for h in HOSTS}  # robots.txt is a response too
    assert per_domain == served
    assert sum(per_domain.values()) == st["stats"]["pages"]
    assert "ledger: " in shown.stdout and " calls a page" in shown.stdout


@pytest.mark.slow
def test_per_domain_concurrency_holds_without_a_delay(home: Path) -> None:
    """No delay: the domain's 2 slots are shared by the chunks crawling it (and
    Scrapy 2.19 alone, with no delay, sends a slot's whole queue at once)."""
    needs_localhost()
    per_domain = 2
    site = HardSite(40, hosts=2, delay=0.2, traps=False)
    with HardServer(site) as server:
        run_id, st = polite_crawl(home, server, 0.0, per_domain)
        most = dict(server.politeness.max_in_flight)
        robots = {h: server.politeness.hits[h]["/robots.txt"] for h in HOSTS}
    assert st["chunks"]["done"] >= 6, st["chunks"]
    assert most == dict.fromkeys(HOSTS, per_domain)  # used, never exceeded
    # With no delay, chunks on both workers meet the second host at once: one
    # of them fetches its robots.txt, the other waits for it in the store.
    assert robots == dict.fromkeys(HOSTS, 1)
    assert_exactly_once(home, run_id, site, server, st)


@pytest.mark.slow
def test_robots_crawl_delay_is_honoured_run_wide(home: Path) -> None:
    # More than plain Scrapy does (its robots.txt middleware ignores Crawl-delay):
    # issue 9 asks for it, as robots.txt is fetched once and kept for the run.
    crawl_delay = 0.3
    site = HardSite(24, crawl_delay=crawl_delay, delay=0.05, traps=False)
    with HardServer(site) as server:
        run_id, st = crawl(
            home, "crawl_delay", server.url, pages_per_chunk=4, env={"HARD_PER_DOMAIN": "2"}
        )
        seen = server.politeness
        host = HOSTS[0]
        gaps = seen.short_gaps(host, crawl_delay - GAP_TOLERANCE, skip="/robots.txt")
    assert st["chunks"]["done"] >= 4, st["chunks"]
    found = {"robots.txt fetches": seen.hits[host]["/robots.txt"], "gaps under the delay": gaps[:5]}
    assert found == {"robots.txt fetches": 1, "gaps under the delay": []}
    assert_exactly_once(home, run_id, site, server, st)


class HangingRobots(HardSite):
    """A ``HardSite`` whose ``/robots.txt`` is read and never answered: the
    connection stays open, silent, until ``release()`` (the test's end)."""

    def __init__(self, pages: int, **kwargs: Any) -> None:
        super().__init__(pages, **kwargs)
        self.released = threading.Event()

    def release(self) -> None:
        """Let the handler threads that hold robots.txt requests end."""
        self.released.set()

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/robots.txt":
            self.released.wait(120)
        return super().respond(key, host, hit)


@pytest.mark.slow
def test_a_robots_txt_that_never_answers_does_not_stall_the_crawl(home: Path) -> None:
    # Each chunk's robots.txt fetch was cut off with the chunk, its pages handed
    # on waiting for it, for ever: the run ended only at max_depth, every page
    # lost. After a bounded wait robots.txt counts as unavailable (everything
    # allowed, as Scrapy does when it cannot fetch the file) and the crawl goes on.
    site = HangingRobots(20, traps=False)
    server = HardServer(site).start()
    try:
        run_id, st = crawl(
            home, "polite", server.url, pages_per_chunk=5, chunk_timeout=3,
            env={"HARD_DELAY": "0"}, timeout=90,
        )  # fmt: skip
        assert_exactly_once(home, run_id, site, server, st)
        robots = server.hits["/robots.txt"]
    finally:
        site.release()
        server.stop()
    assert 1 <= robots <= 3, robots  # not once a chunk
    assert st["stats"].get("robots_bounded") == 1, st["stats"]
