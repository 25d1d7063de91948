"""Crawls of sites that misbehave in ways the hard site does not (issue 9's
adversarial pass), through the CLI as a user runs them, in small chunks so that
every trap crosses chunk boundaries:

* redirects: 301/302/307 chains, a redirect to a page already linked (or
  already fetched), a redirect loop, a page redirecting to itself, a redirect to
  another domain, a redirect to a redirect source;
* a server that resets or closes connections before answering;
* a server with a listen backlog of 1 under a crawl's concurrency;
* an answer on its way to the spider (held by a downloader middleware) at a
  chunk's cut-off;
* a worker killed (SIGKILL) mid-crawl of the hard site, then a new one.

Each asserts what ``tests/test_crawl_hard.py`` asserts: every item once, no
item page fetched more often than a correct crawl fetches it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fanout.backends.base import Backend
from support.hardsite import HOSTS, HardServer, HardSite, _BacklogServer, _RecordingHandler
from support.helpers import JOBS
from support.procs import (
    fanout,
    get_run,
    kill_worker_mid_crawl,
    run_id_of,
    status,
    worker,
)
from support.sites import HTML, NOT_FOUND, HubSite, Reply, SiteServer

JOB = str(JOBS / "hard_crawl.py")


def page(item: str | None, links: list[str]) -> bytes:
    """An item page (``article.page``, as ``hard_crawl.py`` reads it) or a hub."""
    hrefs = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    inner = f"<h1>{item or 'hub'}</h1><ul>{hrefs}</ul>"
    if item is None:
        return f"<html><body><main>{inner}</main></body></html>".encode()
    article = f'<article class="page" data-id="{item}">{inner}</article>'
    return f"<html><body>{article}</body></html>".encode()


class RedirectSite:
    """``/`` links to item pages ``/p/0`` .. and to redirect sources; ``/p/3``
    and ``/p/7`` live on the second host name only (``localhost``), reached by
    a cross-domain redirect and a direct link. ``redirects`` maps a source to
    (status, target as written: a path, or ``@other`` + path for the other host)."""

    pages = 12
    redirects: dict[str, tuple[int, str]] = {
        "/chain/a": (301, "/chain/b"),
        "/chain/b": (302, "/chain/c"),
        "/chain/c": (307, "/p/2"),
        "/seen": (301, "/p/1"),  # /p/1 is linked from / too
        "/loop/a": (302, "/loop/b"),
        "/loop/b": (302, "/loop/a"),
        "/self": (301, "/self"),
        "/cross": (302, "@other/p/3"),
        "/again": (301, "/chain/a"),  # to a redirect source
        "/late": (301, "/p/11"),  # the only way to /p/11
        "/cross-late": (301, "@other/p/7"),  # the only way to /p/7
    }
    remote = {3, 7}  # served under HOSTS[1]

    def links(self, n: int | None) -> list[str]:
        """The hrefs of page ``n`` (``/`` for None), as written."""
        if n is None:
            return ["/p/0", "/p/1", "/chain/a", "/seen", "/loop/a", "/self", "/cross", "/again"]
        only_by_redirect = {*self.remote, 11}
        nxt = [f"/p/{m}" for m in (n + 1, n + 2) if m < self.pages and m not in only_by_redirect]
        if n == 5:
            nxt += ["/late", "/seen", "/loop/b", "/cross-late"]
        if n == 8:
            nxt += ["/chain/b", "/again", "/self"]
        return nxt

    def respond(self, key: str, host: str, hit: int) -> Reply:
        port = host.rpartition(":")[2]
        if key in self.redirects:
            status, target = self.redirects[key]
            if target.startswith("@other"):
                target = f"http://{HOSTS[1]}:{port}{target[len('@other') :]}"
            return Reply(status, (("Location", target), ("Content-Type", HTML)), b"moved")
        origin = f"http://{HOSTS[0]}:{port}"
        if key == "/":
            return Reply(200, (("Content-Type", HTML),), page(None, self.links(None)))
        if key.startswith("/p/") and key[3:].isdigit() and int(key[3:]) < self.pages:
            n = int(key[3:])
            hrefs = [h if h.startswith("http") else origin + h for h in self.links(n)]
            return Reply(200, (("Content-Type", HTML),), page(f"p-{n}", hrefs))
        return NOT_FOUND

    def expected_items(self) -> set[str]:
        return {f"p-{n}" for n in range(self.pages)}


def run_crawl(
    home: Path, url: str, *, pages_per_chunk: int, chunk_timeout: float = 6
) -> tuple[str, dict[str, Any]]:
    """``fanout run`` of ``hard_crawl.py:tutorial`` on ``url``, 2 workers: (run id, status)."""
    result = fanout(
        home, "run", f"{JOB}:tutorial", "-p", f"start_url={url}", "-w", "2",
        "--chunk-timeout", str(chunk_timeout), "-S", f"pages_per_chunk={pages_per_chunk}",
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded", st
    return run_id, st


def items(home: Path, run_id: str) -> Counter[str]:
    """The run's records (``fanout cat``), counted by item id."""
    result = fanout(home, "cat", run_id)
    assert result.returncode == 0, result.stderr
    return Counter(json.loads(line)["id"] for line in result.stdout.splitlines())


@pytest.mark.slow
def test_redirect_chains_loops_and_cross_domain_redirects_give_every_page_once(home: Path) -> None:
    from test_crawl_hard import needs_localhost

    needs_localhost()
    site = RedirectSite()
    with HardServer(site) as server:
        run_id, st = run_crawl(home, server.url, pages_per_chunk=2)
        hits = server.politeness.hits
    got = items(home, run_id)
    assert got == Counter(dict.fromkeys(site.expected_items(), 1)), got
    fetched = Counter()
    for host, counts in hits.items():
        for key, n in counts.items():
            if key.startswith("/p/"):
                fetched[f"{host}{key}"] += n
    twice = {k: n for k, n in fetched.items() if n > 1}
    assert twice == {}, (twice, st["stats"])
    # The loop is followed round once, not chunk after chunk: its way back to
    # /loop/a is a link to a page the chunk holds.
    local = hits[HOSTS[0]]
    assert local["/loop/a"] == 1 and local["/loop/b"] == 1, dict(local)
    # A page redirecting to itself: fetched once, as Scrapy's dupe filter has it.
    assert local["/self"] == 1, dict(local)
    assert st["chunks"]["done"] >= 4, st["chunks"]


# -- connections reset or closed before the answer -----------------------------------

#: Statuses ``FaultySite`` uses for a reply that is not one.
RESET, CLOSE, TRUNCATE = -1, -2, -3


class FaultySite(HardSite):
    """A ``HardSite`` (no traps) whose item pages fail their first request:
    page N with N % 4 == 1 resets the connection (RST) without answering,
    N % 4 == 2 closes it without answering, N % 4 == 3 sends its headers and
    half its body, then closes."""

    FAULTS = {1: RESET, 2: CLOSE, 3: TRUNCATE}

    def __init__(self, pages: int) -> None:
        super().__init__(pages, traps=False)
        self.faulty = {
            key: self.FAULTS[p.number % 4] for key, p in self.pages.items() if p.number % 4
        }

    def respond(self, key: str, host: str, hit: int) -> Reply:
        reply = super().respond(key, host, hit)
        if hit == 1 and key in self.faulty:
            return reply._replace(status=self.faulty[key])
        return reply


class _FaultyHandler(_RecordingHandler):
    def _write(self, reply: Reply, send_body: bool) -> None:
        if reply.status >= 0:
            super()._write(reply, send_body)
            return
        sock = self.connection
        if reply.status == RESET:  # linger 0: close() sends RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif reply.status == TRUNCATE:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {HTML}\r\n"
            head += f"Content-Length: {len(reply.body)}\r\n\r\n"
            self.wfile.write(head.encode() + reply.body[: len(reply.body) // 2])
            self.wfile.flush()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR if reply.status != RESET else socket.SHUT_RD)
        raise ConnectionAbortedError("dropped on purpose")  # the server closes it


class _FaultyServer(_BacklogServer):
    def __init__(self, address: tuple[str, int], owner: HardServer) -> None:
        super().__init__(address, owner)
        self.RequestHandlerClass = _FaultyHandler


class FaultyServer(HardServer):
    """A ``HardServer`` that carries out ``FaultySite``'s faults."""

    def _bind(self) -> _BacklogServer:
        return _FaultyServer((self.host, self.port), self)


@pytest.mark.slow
def test_connections_reset_or_closed_before_the_answer_lose_no_page(home: Path) -> None:
    site = FaultySite(60)
    with FaultyServer(site) as server:
        run_id, st = run_crawl(home, server.url, pages_per_chunk=8)
        hits = server.hits
    got = items(home, run_id)
    assert got == Counter(dict.fromkeys(site.expected_items(), 1)), got
    # Every faulty page: its failure, then Scrapy's retry; every other page once
    # (but for a request handed on still waiting for its answer).
    assert {k: hits[k] for k in site.faulty} == dict.fromkeys(site.faulty, 2), st["stats"]
    again = sum(n - 1 for k, n in hits.items() if k in site.pages and k not in site.faulty)
    assert again <= st["stats"].get("handed_on_in_flight", 0), (dict(hits), st["stats"])
    # Scrapy's retries, or Twisted's own for a GET whose kept-alive connection
    # was closed before its answer: either way seen, and fetched again once.
    assert st["stats"].get("download_errors", 0) > 0, st["stats"]


# -- an answer on its way at the cut-off ----------------------------------------------


@pytest.mark.slow
def test_an_answer_on_its_way_to_the_spider_at_the_cut_off_is_parsed_not_lost(
    home: Path,
) -> None:
    """A downloader middleware (``hard_crawl.HoldStartAnswer``) holds the start
    page's answer until just past the root chunk's cut-off: the answer is no
    longer in flight (it is not handed on) and not yet the scraper's. The chunk
    left without it, so the run "succeeded" with no item at all; it now waits
    for it and parses it, and every page follows."""
    site = HubSite(12, delay=0.0)
    with SiteServer(site) as server:
        result = fanout(
            home, "run", f"{JOB}:held_start", "-p", f"start_url={server.url}", "-w", "1",
            "--chunk-timeout", "12", timeout=120,
        )  # fmt: skip
        hits = server.hits
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = run_id_of(result)
    assert status(home, run_id)["state"] == "succeeded"
    assert items(home, run_id) == Counter({f"p{n}": 1 for n in range(12)})
    assert hits["/"] == 1, dict(hits)


# -- a listen backlog of 1 -----------------------------------------------------------


@pytest.mark.slow
def test_a_listen_backlog_of_one_under_a_crawl_s_concurrency_loses_no_page(home: Path) -> None:
    from test_crawl_hard import assert_exactly_once

    site = HardSite(200)
    with HardServer(site, backlog=1) as server:
        run_id, st = run_crawl(home, server.url, pages_per_chunk=30)
        assert_exactly_once(home, run_id, site, server, st)
    assert st["chunks"]["done"] >= 5, st["chunks"]


# -- SIGKILL of a worker mid-crawl, on the hard site -----------------------------------


@pytest.mark.slow
def test_sigkill_mid_crawl_on_the_hard_site_then_resume_gives_every_item_once(
    home: Path, tmp_path: Path, ledger: Backend
) -> None:
    # test_crawl_process kills a worker crawling the book site; here the site
    # has traps (500s, redirect chains, links in several spellings) and one of
    # them may be in flight at the kill.
    site = HardSite(400, delay=0.02)
    with HardServer(site, backlog=5) as server:
        submitted = fanout(
            home, "submit", f"{JOB}:tutorial", "-p", f"start_url={server.url}",
            "-S", "pages_per_chunk=40",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip()
        args = ("--workers", "2", "--chunk-timeout", "6")
        with worker(home, tmp_path, *args) as proc:
            kill_worker_mid_crawl(
                ledger, run_id, proc, lambda: sum(server.hits.values()), len(site.pages) // 3
            )
        assert get_run(ledger, run_id).state.value == "running", "the kill came too late"
        # The dead worker's leases and messages come back after 6 + 5 (+ 5) s.
        resume = fanout(home, "worker", "--until-idle", *args, timeout=150)
        assert resume.returncode == 0, resume.stderr
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["chunks"]["dead"] == 0, st
    assert st["crashed"] >= 1, st  # the kill caught attempts in flight
    got = items(home, run_id)
    assert got == Counter(dict.fromkeys(site.expected_items(), 1)), {
        "missing": sorted(site.expected_items() - set(got))[:5],
        "twice": sorted(k for k, n in got.items() if n > 1)[:5],
    }
