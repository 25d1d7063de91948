"""What a crawl chunk costs besides its pages (issue 9's benchmark): each chunk
is a process forked from the worker, and what it inherits must not be paid
for again in every chunk.

The chunks run in process, through ``fanout.crawl.chunk.run_chunk`` (which
forks the chunk's Scrapy process), against a small site served from this
process.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import scrapy
from scrapy.http import Response, TextResponse

from fanout.backends import open_backend
from fanout.backends.base import Backend
from fanout.crawl.chunk import run_chunk
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
    # every chunk. Scrapy's console and control-port extensions are off in a
    # chunk, so neither the worker nor the chunk imports them.
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
    unused = {"scrapy.extensions.telnet", "scrapy.extensions.remote_control"}
    assert unused & worker == set()
