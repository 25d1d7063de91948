"""Crawl jobs: an unmodified Scrapy spider as checkpointed, fanned-out chunks."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import scrapy
from scrapy.http import FormRequest, JsonRequest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, RunState, TaskState
from fanout.crawl.codec import CodecError, check_keepable, request_from_json, request_to_json
from support.helpers import JOBS, drain
from support.sites import SiteServer, TrapSite

TRAP_JOB = str(JOBS / "trap_crawl.py")


@pytest.fixture(scope="module")
def trap() -> Iterator[SiteServer]:
    site = SiteServer(TrapSite()).start()
    yield site
    site.stop()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=tmp_path / "home")
    yield backend
    backend.close()


def _crawl(backend: Backend, url: str, monkeypatch: pytest.MonkeyPatch, depth: int) -> str:
    monkeypatch.setenv("TRAP_DEPTH", str(depth))
    # The job module reads its settings at import: load it afresh for this test.
    from fanout import jobs

    jobs._loaded.pop(TRAP_JOB, None)
    return coordinator.submit(backend, TRAP_JOB, {"start_url": url}).run_id


@pytest.mark.parametrize("depth", [2, 4])
def test_trap_site_every_item_once_each_page_fetched_once(
    local: Backend, trap: SiteServer, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    site: TrapSite = trap.site  # type: ignore[assignment]
    trap.reset_hits()
    run_id = _crawl(local, trap.url, monkeypatch, depth)
    run = drain(local, run_id, chunk_timeout=20, limit=120)
    assert run.state == RunState.SUCCEEDED
    items = Counter(r["id"] for r in coordinator.committed_records(local, run_id))
    assert [i for i, n in items.items() if n > 1] == []
    assert set(items) == site.expected_items(depth)
    # Run-wide de-duplication: no normal page was fetched twice, across chunks.
    hits = dict(trap.hits)
    assert {p: n for p, n in hits.items() if p in site.normal_paths and n > 1} == {}
    assert set(hits) - {"/robots.txt"} == site.expected_fetches(depth)
    # It really was split: many chunks, and the depth limit held across them.
    assert run.tasks_done >= 4
    assert run.stats["pages"] > 0 and run.stats["duplicates"] > 0
    assert run.stats.get("status/404", 0) >= 1


def test_depth_limit_holds_across_chunk_boundaries(
    local: Backend, trap: SiteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    trap.reset_hits()
    run_id = _crawl(local, trap.url, monkeypatch, 6)
    drain(local, run_id, chunk_timeout=20, limit=120)
    chain = sorted(int(p.rsplit("/", 1)[1]) for p in trap.hits if p.startswith("/chain/"))
    site: TrapSite = trap.site  # type: ignore[assignment]
    expected = sorted(
        int(p.rsplit("/", 1)[1]) for p in site.expected_fetches(6) if p.startswith("/chain/")
    )
    assert chain == expected and chain  # the endless chain stopped exactly at the limit


def test_status_counts_pages_duplicates_and_http_statuses(
    local: Backend, trap: SiteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = _crawl(local, trap.url, monkeypatch, 2)
    drain(local, run_id, chunk_timeout=20, limit=120)
    status = coordinator.status(local, run_id).to_dict()
    assert status["pending_requests"] == 0
    assert status["stats"]["status/200"] >= 10 and status["stats"]["handed_on"] > 0


def test_memory_backend_is_refused_for_crawls(
    mem: Backend, trap: SiteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = _crawl(mem, trap.url, monkeypatch, 1)
    run = drain(mem, run_id)
    assert run.state == RunState.FAILED
    (dead,) = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert "shared across processes" in (dead.error or "")


class _Spider(scrapy.Spider):
    name = "codec"

    def parse(self, response: object) -> None: ...

    def parse_item(self, response: object) -> None: ...


def test_requests_round_trip_as_json_without_pickle() -> None:
    spider = _Spider()
    original = scrapy.Request(
        "http://example.test/a?b=1",
        method="POST",
        body=b"\x00\xffbinary",
        headers={"X-Token": "t"},
        cookies={"session": "s"},
        callback=spider.parse_item,
        errback=spider.parse,
        cb_kwargs={"page": 3, "tags": ("a", "b")},
        meta={"depth": 4, "retry_times": 1, "mine": {"$odd": [1, 2]}, "raw": b"x"},
        priority=-2,
        dont_filter=True,
    )
    data = request_to_json(original, spider)
    again = request_from_json(json.loads(json.dumps(data)), spider)
    assert (again.url, again.method, again.body) == (original.url, "POST", original.body)
    assert again.headers.getlist("X-Token") == [b"t"]
    assert again.cookies == {"session": "s"}
    assert again.callback == spider.parse_item and again.errback == spider.parse
    assert again.cb_kwargs == {"page": 3, "tags": ("a", "b")}
    assert again.meta == original.meta
    assert (again.priority, again.dont_filter) == (-2, True)
    form = FormRequest("http://example.test/f", formdata={"q": "x"})
    assert isinstance(request_from_json(request_to_json(form, spider), spider), FormRequest)
    js = JsonRequest("http://example.test/j", data={"a": 1})
    assert isinstance(request_from_json(request_to_json(js, spider), spider), JsonRequest)


class _Product(scrapy.Item):
    name = scrapy.Field()
    seller = scrapy.Field()


@dataclasses.dataclass(frozen=True)
class _Seller:
    id: int
    since: tuple[int, int]
    rank: int = dataclasses.field(default=0, init=False)


def test_items_in_meta_and_cb_kwargs_travel_as_their_own_classes() -> None:
    """Scrapy's "pass the item on" pattern: an Item (holding a dataclass) in meta,
    a dataclass in cb_kwargs, rebuilt as the same classes with the same values."""
    spider = _Spider()
    seller = _Seller(7, (2019, 5))
    object.__setattr__(seller, "rank", 3)  # a field __init__ does not take
    product = _Product(name="lamp", seller=seller)
    original = scrapy.Request(
        "http://example.test/p/1",
        callback=spider.parse_item,
        meta={"product": product, "many": [product]},
        cb_kwargs={"seller": seller},
    )
    again = request_from_json(json.loads(json.dumps(request_to_json(original, spider))), spider)
    got = again.meta["product"]
    assert type(got) is _Product and dict(got) == dict(product)
    assert type(got["seller"]) is _Seller and got["seller"].rank == 3
    assert type(again.meta["many"][0]) is _Product
    assert again.cb_kwargs == {"seller": seller}


def test_an_item_class_a_message_names_must_be_one_of_its_spider() -> None:
    """A message is untrusted: the class it names must be an Item or dataclass
    the spider's module defines or imports, found without importing anything,
    and only that class's own fields are set."""
    spider = _Spider()
    good = request_to_json(
        scrapy.Request("http://example.test/", meta={"p": _Product(name="x")}), spider
    )
    fields = good["meta"]["p"]["$item"]["fields"]
    for name in ("subprocess:Popen", "not_a_loaded_module:Thing", "os:path", f"{__name__}:nope"):
        forged = {**good, "meta": {"p": {"$item": {"class": name, "fields": fields}}}}
        with pytest.raises(CodecError, match="is not an item class of this spider"):
            request_from_json(forged, spider)
    assert "not_a_loaded_module" not in sys.modules
    seller = f"{__name__}:_Seller"
    for odd in ({"__dict__": {}}, {"id": 1, "since": [1, 2], "__class__": "x"}, {"price": 1}):
        forged = {**good, "meta": {"p": {"$item": {"class": seller, "fields": odd}}}}
        with pytest.raises(CodecError, match="cannot be rebuilt"):
            request_from_json(forged, spider)


@dataclasses.dataclass
class _WithInitVar:
    price: int
    currency: dataclasses.InitVar[str]


@dataclasses.dataclass
class _Rescaling:
    cents: int

    def __post_init__(self) -> None:
        self.cents *= 100  # a second __init__ would scale it again


@dataclasses.dataclass
class _Unset:
    seen: int = dataclasses.field(init=False)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_WithInitVar(5, "EUR"), "cannot be rebuilt from its fields"),
        (_Rescaling(2), "is not equal to itself"),
        (_Unset(), "cannot be rebuilt from its fields"),
    ],
    ids=["InitVar", "__post_init__ that changes fields", "unset init=False field"],
)
def test_an_item_that_would_not_rebuild_as_itself_is_refused_when_scheduled(
    value: object, reason: str
) -> None:
    request = scrapy.Request("http://example.test/", meta={"p": value})
    with pytest.raises(CodecError, match=reason):
        check_keepable(request, _Spider())


def test_an_item_class_the_spider_s_module_does_not_know_is_refused() -> None:
    class Elsewhere(scrapy.Spider):
        name = "elsewhere"

    Elsewhere.__module__ = "fanout.crawl.codec"  # a module that imports no item class of ours
    with pytest.raises(CodecError, match="is not defined or imported in the spider's module"):
        request_to_json(
            scrapy.Request("http://example.test/", meta={"p": _Product(name="x")}), Elsewhere()
        )


def test_untrusted_request_data_is_refused() -> None:
    spider = _Spider()
    good = request_to_json(scrapy.Request("http://example.test/", callback=spider.parse), spider)
    with pytest.raises(CodecError, match="not allowed"):
        request_from_json({**good, "_class": "os.system"}, spider)
    with pytest.raises(CodecError, match="no method 'nope'"):
        request_from_json({**good, "callback": "nope"}, spider)
    with pytest.raises(CodecError, match="cannot travel as JSON"):
        request_to_json(scrapy.Request("http://example.test/", meta={"x": object()}), spider)
