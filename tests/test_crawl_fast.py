"""What a crawl chunk costs besides its pages (issue 9's benchmark): each chunk
is a process forked from the worker, and what it inherits must not be paid
for again in every chunk.

The chunks run in process, through ``fanout.crawl.chunk.run_chunk`` (which
forks the chunk's Scrapy process), against a small site served from this
process.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import scrapy
from scrapy.http import Response, TextResponse

from fanout.backends import open_backend
from fanout.backends.base import Backend
from fanout.crawl.chunk import run_chunk, windows
from support.sites import HTML, NOT_FOUND, Reply, SiteServer

RUN = "fast-run"


class Leaves:
    """``/`` links to ``/p/0`` … ``/p/{n-1}``, each a leaf."""

    def __init__(self, pages: int) -> None:
        self.pages = pages

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/":
            links = [f"/p/{i}" for i in range(self.pages)]
        elif key.startswith("/p/") and key[3:].isdigit() and int(key[3:]) < self.pages:
            links = []
        else:
            return NOT_FOUND
        hrefs = "".join(f'<a href="{href}">{href}</a>' for href in links)
        body = f'<html><body><article data-id="{key}">{hrefs}</article></body></html>'
        return Reply(200, (("Content-Type", HTML),), body.encode())


class GcProbe(scrapy.Spider):
    """One item a page, saying how the chunk process's collector stands."""

    name = "gc-probe"

    def parse(self, response: Response, **kwargs: Any) -> Any:
        if not isinstance(response, TextResponse):
            return
        yield {
            "id": response.css("article").attrib["data-id"],
            "frozen": gc.get_freeze_count(),
            "enabled": gc.isenabled(),
            "modules": sorted(sys.modules),
        }
        yield from response.follow_all(css="a")


class LeavesSpider(GcProbe):
    """The probe, started from the ``start_url`` run param."""

    name = "leaves"

    def __init__(self, start_url: str = "", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_urls = [start_url]

    def parse(self, response: Response, **kwargs: Any) -> Any:
        if not isinstance(response, TextResponse):
            return
        yield {"id": response.css("article").attrib["data-id"]}
        yield from response.follow_all(css="a")


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=tmp_path / "home")
    yield backend
    backend.close()


def test_a_chunk_leaves_what_it_inherits_from_the_worker_out_of_the_collector(
    local: Backend,
) -> None:
    # A full collection in the forked chunk would walk every object inherited
    # from the worker (Scrapy, Twisted, fanout: ~100,000) and, writing their GC
    # headers, copy the worker's heap page by page: ~80 ms a chunk. Frozen, they
    # are left alone; the chunk's own garbage is still collected.
    with SiteServer(Leaves(3)) as server:
        result = run_chunk(
            GcProbe,
            {},
            [{"url": server.url}],
            crawl=local.crawl,
            run_id=RUN,
            chunk_id="0/0",
            pages_per_chunk=50,
            time_left=20.0,
        )
    assert result.errors == []
    assert sorted(item["id"] for item in result.items) == ["/", "/p/0", "/p/1", "/p/2"]
    for item in result.items:
        assert item["enabled"] is True
        assert item["frozen"] > 20_000  # what the worker had: Scrapy is imported
    assert gc.get_freeze_count() == 0  # the worker's own collector is untouched


def test_a_chunk_imports_nothing_the_worker_has_not(local: Backend) -> None:
    # The worker imports (prewarms) what a chunk loads, once; each forked chunk
    # inherits it. A module first imported in the chunk is imported again by
    # every chunk.
    with SiteServer(Leaves(2)) as server:
        result = run_chunk(
            GcProbe,
            {},
            [{"url": server.url}],
            crawl=local.crawl,
            run_id=RUN,
            chunk_id="0/0",
            pages_per_chunk=50,
            time_left=20.0,
        )
    assert result.errors == []
    assert len(result.items) == 3
    # The one module a chunk must add: the reactor it installs, which the
    # worker never may (Twisted's reactor cannot be restarted).
    worker = set(sys.modules) | {"twisted.internet.reactor"}
    for item in result.items:
        assert sorted(set(item["modules"]) - worker) == []


JOB = """
import sys
sys.path.insert(0, {tests!r})
from test_crawl_fast import LeavesSpider
from fanout.crawl import CrawlJob

SCHEMA = {{"type": "record", "name": "leaf", "fields": [{{"name": "id", "type": "string"}}]}}
job = CrawlJob(LeavesSpider, schema=SCHEMA, name="leaves", pages_per_chunk={per_chunk})
"""


def test_the_root_chunk_hands_on_after_a_quarter_of_its_pages(
    local: Backend, tmp_path: Path
) -> None:
    # The root chunk runs alone: every other worker waits for its children.
    # It fetches pages_per_chunk // ROOT_SHARE pages, then hands on; the other
    # chunks fetch up to pages_per_chunk.
    from fanout import coordinator
    from fanout.backends.base import RunState, TaskKey
    from fanout.crawl import ROOT_SHARE
    from support.helpers import drain

    job = tmp_path / "leaves_job.py"
    job.write_text(JOB.format(tests=str(Path(__file__).parent), per_chunk=20))
    with SiteServer(Leaves(40)) as server:
        run_id = coordinator.submit(local, str(job), {"start_url": server.url}).run_id
        run = drain(local, run_id, chunk_timeout=20, limit=60)
        hits = dict(server.hits)
    assert run.state == RunState.SUCCEEDED
    ids = sorted(r["id"] for r in coordinator.committed_records(local, run_id))
    assert ids == sorted(["/", *(f"/p/{i}" for i in range(40))])
    assert all(n == 1 for n in hits.values()), hits
    root = local.ledger.get_task(TaskKey(run_id, "0", 0))
    assert root is not None and root.output is not None
    assert root.output.records == 20 // ROOT_SHARE
    others = [t for t in local.ledger.list_tasks(run_id) if t.chunk_id != "0" and t.output]
    sizes = [t.output.records for t in others if t.output]
    assert max(sizes) <= 20 and max(sizes) > 20 // ROOT_SHARE


def test_loading_a_crawl_job_warms_the_process_its_workers_fork_from(tmp_path: Path) -> None:
    # `fanout run` loads the job before it forks its workers: what a chunk
    # loads is imported then, once, not in each worker's first chunk. Scrapy's
    # console and control-port extensions are off in a chunk: not imported
    # (RemoteControl alone took ~0.2 s). A fresh interpreter: this one has
    # imported whatever the other tests needed.
    job = tmp_path / "leaves_job.py"
    job.write_text(JOB.format(tests=str(Path(__file__).parent), per_chunk=20))
    probe = (
        "import runpy, sys; runpy.run_path(sys.argv[1]);"
        " print('scrapy.core.downloader.handlers.http11' in sys.modules,"
        " 'scrapy.downloadermiddlewares.cookies' in sys.modules,"
        " 'scrapy.extensions.telnet' in sys.modules,"
        " 'scrapy.extensions.remote_control' in sys.modules)"
    )
    root = str(Path(__file__).parents[1])
    out = subprocess.run(
        [sys.executable, "-c", probe, str(job)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert out.stdout.split() == ["True", "True", "False", "False"]


# -- a newcomer's share of a domain ------------------------------------------------


def _gate(backend: Backend, chunk_id: str, active: set[scrapy.Request]) -> Any:
    """A chunk's DomainGate on a stand-in crawler whose downloader has ``active`` in flight."""
    import time
    from types import SimpleNamespace

    from scrapy.settings import Settings
    from scrapy.statscollectors import MemoryStatsCollector

    from fanout.crawl.politeness import DomainGate

    # Scrapy's downloader and its download slot both count what is in flight.
    slot = SimpleNamespace(active=active, concurrency=16, delay=0.0, queue=[])
    downloader = SimpleNamespace(
        active=active,
        slots={"a.test": slot} if active else {},
        per_slot_settings={},
        get_slot_key=lambda request: request.url.split("/")[2],
    )
    crawler = SimpleNamespace(
        settings=Settings({"CONCURRENT_REQUESTS_PER_DOMAIN": 16}),
        engine=SimpleNamespace(downloader=downloader),
    )
    crawler.stats = MemoryStatsCollector(crawler)
    chunk = {"crawl": backend.crawl, "run_id": RUN, "chunk_id": chunk_id}
    return DomainGate(crawler, {**chunk, "expires": time.time() + 60})


def test_a_newcomer_gets_its_share_once_the_holder_s_requests_fit_its_own(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunk A holds all 16 slots of a.test, 16 requests in flight; chunk B (the
    # next chunk of the other worker) asks and must wait. A renews: its share is
    # 8, but it is charged 16 while they are in flight. As soon as 8 have
    # answered, A says so, and B's next ask gets 8: B does not wait for A's
    # next renewal. The site never has more than 16 in flight.
    from fanout.crawl import politeness

    requests = [scrapy.Request(f"http://a.test/{i}") for i in range(16)]
    a = _gate(local, "0/1", set(requests))
    b = _gate(local, "0/2", set())
    assert a.allows(requests[0]) and a.slots["a.test"] == 16
    newcomer = scrapy.Request("http://a.test/new")
    assert not b.allows(newcomer)
    monkeypatch.setattr(politeness, "RENEW_EVERY", 0.0)
    a.renew()
    assert a.slots["a.test"] == 8
    b.ask_after.clear()  # B asks again (it does every ASK_EVERY s)
    assert not b.allows(newcomer)  # A still has 16 in flight
    for request in requests[:8]:  # answered one by one
        a.crawler.engine.downloader.active.discard(request)
        a.answered(request)
    b.ask_after.clear()
    assert b.allows(newcomer)
    assert b.slots["a.test"] == 8
    assert len(a.crawler.engine.downloader.active) + b.slots["a.test"] <= 16


# -- what the worker knows is taken, from chunk to chunk ---------------------------


class Mesh:
    """``/`` links to ``/p/0`` … ``/p/{n-1}``, and each of those to all the others."""

    def __init__(self, pages: int) -> None:
        self.pages = pages

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key != "/" and not (key.startswith("/p/") and key[3:].isdigit()):
            return NOT_FOUND
        if key != "/" and int(key[3:]) >= self.pages:
            return NOT_FOUND
        hrefs = "".join(f'<a href="/p/{i}">{i}</a>' for i in range(self.pages))
        body = f'<html><body><article data-id="{key}">{hrefs}</article></body></html>'
        return Reply(200, (("Content-Type", HTML),), body.encode())


def test_a_worker_does_not_ask_the_ledger_again_for_what_committed_chunks_took(
    local: Backend, tmp_path: Path
) -> None:
    # The root chunk claims every /p/N from "/" (41 fingerprints asked: the
    # start page and its 40 links) and hands them on to 4 chunks, which every
    # page links to again. The root committed, so its claims are taken for
    # good: its children, run by the same worker, ask nothing. (Before, each
    # asked once for each link it did not hold itself: ~120 more.)
    from fanout import coordinator
    from fanout.backends.base import RunState
    from support.helpers import drain

    job = tmp_path / "mesh_job.py"
    job.write_text(JOB.format(tests=str(Path(__file__).parent), per_chunk=10))
    with SiteServer(Mesh(40)) as server:
        run_id = coordinator.submit(local, str(job), {"start_url": server.url}).run_id
        run = drain(local, run_id, chunk_timeout=20, limit=60)
        hits = dict(server.hits)
    assert run.state == RunState.SUCCEEDED
    ids = sorted(r["id"] for r in coordinator.committed_records(local, run_id))
    assert ids == sorted(["/", *(f"/p/{i}" for i in range(40))])
    assert all(n == 1 for n in hits.values()), hits
    assert run.tasks_done >= 5
    assert run.stats["ledger_fingerprints_asked"] == 41
    assert run.stats["known_taken"] > 0


def test_only_the_claims_of_an_attempt_known_to_have_committed_are_trusted() -> None:
    # An attempt that never committed left stale claims, which the next chunk
    # to find those links takes over: trusting them would lose the pages.
    from fanout.crawl.known import KnownTaken, parse_lineage

    known = KnownTaken()
    known.remember("r", "0/1", "t1", ["a"])  # failed at its commit ...
    known.remember("r", "0/1", "t2", ["b"])  # ... the retry committed
    known.remember("r", "0/2", "t1", ["c"])  # not known yet
    assert known.known("r") == set()
    known.learn("r", {"0": "t0", "0/1": "t2"})  # a child of 0/1 runs here
    assert known.known("r") == {"b"}
    known.remember("r", "0/1", "t2", ["d"])  # known committed: trusted at once
    assert known.known("r") == {"b", "d"}
    assert known.known("another run") == set()  # a run of its own
    assert parse_lineage({"0": "t0"}) == {"0": "t0"}
    assert parse_lineage({"0": 1}) == {} and parse_lineage(["0"]) == {}
    assert parse_lineage({str(i): "t" for i in range(65)}) == {}


def test_requests_handed_on_are_split_into_chunks_of_even_sizes() -> None:
    # 300 requests at 250 a chunk: two children of 150, not 250 and 50 (the
    # small one's worker would sit idle while the big one crawls on).
    import time

    from fanout.context import ChunkContext
    from fanout.crawl import CrawlJob

    job = CrawlJob(scrapy.Spider, schema=None, name="t", pages_per_chunk=250)

    def sizes(count: int) -> list[int]:
        ctx = ChunkContext(
            params={}, run_id="r", chunk_id="0/1", seq=0, attempt=1, cursor=None,
            soft_deadline=time.monotonic() + 60, writer=None, job_name="t",
            settings=job.settings,
        )  # fmt: skip
        pending = [
            {"request": {"url": f"http://a.test/{i}", "meta": {}}, "throttled": False}
            for i in range(count)
        ]
        job._hand_on(pending, ctx)
        urls = [r["url"] for s in ctx.spawned for r in s.payload["requests"]]
        assert sorted(urls) == sorted(p["request"]["url"] for p in pending)
        return [len(s.payload["requests"]) for s in ctx.spawned]

    assert sizes(300) == [150, 150]
    assert sizes(501) == [167, 167, 167]
    assert sizes(250) == [250]
    assert sizes(7) == [7]
    assert sizes(0) == []


def test_a_site_that_stays_away_is_tried_again_after_pauses_that_double() -> None:
    # Requests held because their site is away (refused, failing all over) go
    # on together, whatever their levels, after throttle_base, then twice and
    # four times that, no more; each try was a chunk per pages_per_chunk of them
    # after throttle_base alone, for as long as the site stayed away.
    import time

    from fanout.context import ChunkContext
    from fanout.crawl import CrawlJob
    from fanout.crawl.backoff import AWAY_META, THROTTLE_META

    job = CrawlJob(scrapy.Spider, schema=None, name="t", pages_per_chunk=250, throttle_base=5.0)

    def handed_on(away: int, levels: list[int]) -> tuple[list[float], list[dict[str, Any]]]:
        ctx = ChunkContext(
            params={}, run_id="r", chunk_id="0/1", seq=0, attempt=1, cursor=None,
            soft_deadline=time.monotonic() + 60, writer=None, job_name="t",
            settings=job.settings,
        )  # fmt: skip
        meta = {AWAY_META: away} if away else {}
        pending = [
            {
                "request": {"url": f"http://a.test/{i}", "meta": {**meta, THROTTLE_META: level}},
                "throttled": True,
                "away": True,
            }
            for i, level in enumerate(levels)
        ]
        job._hand_on(pending, ctx)
        requests = [r for s in ctx.spawned for r in s.payload["requests"]]
        return [s.delay for s in ctx.spawned], requests

    pauses = [handed_on(away, [0, 0, 2])[0] for away in range(5)]
    assert pauses == [[5.0], [10.0], [20.0], [20.0], [20.0]]
    _, requests = handed_on(1, [0, 3])
    assert [r["meta"][AWAY_META] for r in requests] == [2, 2]
    assert [r["meta"][THROTTLE_META] for r in requests] == [0, 3]  # their own levels kept


@pytest.mark.parametrize("time_left", [0.3, 0.9, 1.5, 2.0, 5.0, 50.0, 800.0])
def test_a_chunk_takes_new_requests_for_at_least_half_its_time(time_left: float) -> None:
    # At --chunk-timeout 2 a crawl chunk starts ~0.9 s before its soft deadline;
    # its drain was 1 s, so it took no request at all and handed everything on,
    # generation after generation, to max_depth (a black-box helper's site with
    # a listen backlog of 1 and 0.6 s pages: stopped 3 runs of 3; now each
    # succeeded, 41 pages of 41).
    drain, cut = windows(time_left)
    assert time_left - drain >= 0.5 * time_left  # taking requests
    assert cut < drain  # in-flight requests get time to finish before the cut
    if time_left >= 5.0:  # longer chunks: as before
        assert (drain, cut) == (max(1.0, 0.2 * time_left), max(0.2, min(0.5, 0.05 * time_left)))
