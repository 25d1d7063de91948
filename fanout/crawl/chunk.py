"""One crawl chunk: the real Scrapy engine on a slice of the frontier, in a
fresh process.

Twisted's reactor cannot be restarted, so every chunk forks a child from the
worker (which has Scrapy imported but no reactor running): the child installs a
reactor, crawls, and streams its items, pending requests and stats back over a
pipe as JSON lines, then exits. The worker turns the items into Avro records
(the usual commit protocol) and the pending requests into child chunks.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import scrapy.crawler  # noqa: F401  (imported before the fork: children start warm)
from scrapy import Request, Spider
from scrapy.exceptions import CloseSpider

import fanout.crawl.channel as channel_module
from fanout.crawl.backoff import DEFAULT_THROTTLE_BASE
from fanout.crawl.channel import CHUNK, send
from fanout.crawl.claims import book_of
from fanout.crawl.closing import spider_closed_itself
from fanout.crawl.codec import decode_value, request_from_json
from fanout.crawl.components import fail_chunk
from fanout.crawl.politeness import note_frontier

if TYPE_CHECKING:
    from fanout.backends.base import Store
    from fanout.backends.crawlstate import CrawlState


@dataclass
class ChunkResult:
    """What a crawl chunk sent back."""

    items: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Fingerprints this attempt claimed in the ledger (``fanout.crawl.known``).
    claims: list[str] = field(default_factory=list)
    #: Why the chunk gave up (a request it cannot hand on): a permanent error.
    fatal: list[str] = field(default_factory=list)
    #: The reason the spider closed itself with (``CloseSpider``), if it did.
    closed: str | None = None
    #: Requests Scrapy gave up on, each with why (``fanout.crawl.givenup``).
    given_up: list[dict[str, Any]] = field(default_factory=list)


def frontier_spider(base: type[Spider], frontier: list[dict[str, Any]] | None) -> type[Spider]:
    """``base``, starting from ``frontier`` (serialized requests) instead of its own
    start requests when given. Every request is scheduled at once, so that any
    the chunk does not reach are handed on rather than lost."""

    class ChunkSpider(base):  # type: ignore[valid-type,misc]
        async def start(self) -> Any:
            CHUNK["spider"] = self
            engine = self.crawler.engine
            book = book_of(self.crawler)
            if frontier is not None:
                for data in frontier:  # claimed by the parent: the chunk holds them
                    request = book.adopt(request_from_json(data, self))
                    note_frontier(request)
                    engine.crawl(request)
                return
            starts: list[Request] = []
            items = 0
            failed: Exception | None = None
            try:
                async for thing in super().start():
                    if isinstance(thing, Request):
                        starts.append(thing)
                    else:
                        items += 1
                        yield thing
            except CloseSpider as exc:
                spider_closed_itself(str(exc.reason))
                raise  # Scrapy's own way to stop: not a failure
            except Exception as exc:
                if not starts and not items:
                    # Nothing to crawl (a start URL with no scheme, a spider
                    # argument missing, a service start() asks that is down): a
                    # run that "succeeds" with no records would hide it. The
                    # chunk fails, saying why, and is retried like any other.
                    fail_chunk(
                        f"the spider's start raised before it yielded anything:"
                        f" {type(exc).__name__}: {exc}"
                    )
                failed = exc  # Scrapy logs it and crawls what came before
            # Claimed in one call, even with Scrapy's default dont_filter on
            # start requests, so that a link back to a start page is a duplicate;
            # a start request is crawled anyway when its dont_filter says so.
            won = {id(r) for r in book.claim(starts)}
            for request in starts:
                if id(request) in won or request.dont_filter:
                    engine.crawl(request)
            if failed is not None:
                raise failed

    ChunkSpider.__name__ = ChunkSpider.__qualname__ = base.__name__
    ChunkSpider.__module__ = base.__module__
    return ChunkSpider


#: Scrapy's extensions that serve a console or control port: a chunk is
#: short-lived and unattended, so they are off (``_settings``) and not loaded.
UNUSED_EXTENSIONS = (
    "scrapy.extensions.telnet.TelnetConsole",
    "scrapy.extensions.remote_control.RemoteControl",
)


def _settings(
    spider_cls: type[Spider], log_level: str, closespider: dict[str, float] | None = None
) -> Any:
    from scrapy.settings import Settings

    settings = Settings()
    here = "fanout.crawl.components."
    settings.set("SCHEDULER", here + "ChunkScheduler", priority="cmdline")
    # The claim rules (fanout.crawl.claims) replace Scrapy's dupe filter.
    settings.set("DUPEFILTER_CLASS", "scrapy.dupefilters.BaseDupeFilter", priority="cmdline")
    middlewares = settings.getdict("DOWNLOADER_MIDDLEWARES_BASE")
    # Sees a response just before Scrapy's retry (550) does ...
    middlewares["fanout.crawl.throttle.ThrottleWatch"] = 555
    # ... and nearest the engine, once every other middleware let it through;
    middlewares["fanout.crawl.throttle.ThrottleRescue"] = 1
    # what got past both given up: kept (fanout.crawl.givenup).
    middlewares["fanout.crawl.givenup.GiveUpWatch"] = 0
    # First, nearest the downloader: late answers of requests handed on.
    middlewares[here + "ParkHandedOn"] = 1000
    # robots.txt once per run, from the store (same place as Scrapy's own).
    robots = middlewares.pop("scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware", 100)
    middlewares["fanout.crawl.politeness.SharedRobotsTxt"] = robots
    settings.set("DOWNLOADER_MIDDLEWARES_BASE", middlewares, priority="cmdline")
    spider_mw = settings.getdict("SPIDER_MIDDLEWARES_BASE")
    # Nearest the engine: claims what every other spider middleware let through.
    spider_mw[here + "ClaimOutput"] = 10
    # Nearest the spider: a CloseSpider from a callback ends the run too.
    spider_mw["fanout.crawl.closing.CloseWatch"] = 2000
    settings.set("SPIDER_MIDDLEWARES_BASE", spider_mw, priority="cmdline")
    extensions = settings.getdict("EXTENSIONS_BASE")
    extensions[here + "ChunkBudget"] = 0
    for path in UNUSED_EXTENSIONS:
        # Switched off below: not even imported (RemoteControl's import alone
        # is ~0.2 s). A spider that lists one in EXTENSIONS still gets it, off.
        extensions.pop(path, None)
    settings.set("EXTENSIONS_BASE", extensions, priority="cmdline")
    pipelines = settings.getdict("ITEM_PIPELINES_BASE")
    pipelines[here + "ItemSink"] = 2**31 - 1  # after the user's own pipelines
    settings.set("ITEM_PIPELINES_BASE", pipelines, priority="cmdline")
    # DOWNLOAD_TIMEOUT keeps the spider's value: a request still waiting for its
    # answer at the chunk's cut-off is handed on, not timed out (ChunkBudget).
    # No per-chunk servers: a chunk is short-lived and unattended.
    settings.set("TELNETCONSOLE_ENABLED", False, priority="cmdline")
    settings.set("REMOTE_CONTROL_ENABLED", False, priority="cmdline")
    settings.set("LOG_LEVEL", log_level, priority="project")
    # Scrapy logs its versions at start-up even below its log level, reading
    # package metadata and running `uname -p`: ~30 ms a chunk, for nothing.
    settings.set("LOG_VERSIONS", [], priority="cmdline")
    # Above the spider's own: what is left of its run-wide limits (fanout.crawl.limits).
    for name, left in (closespider or {}).items():
        settings.set(name, left if name == "CLOSESPIDER_TIMEOUT" else int(left), priority="cmdline")
    return settings


_warm = False


def prewarm() -> None:
    """Import, once per worker process, every module a crawler loads from its
    settings, so each forked chunk starts warm instead of importing them again."""
    global _warm
    if _warm:
        return
    from scrapy.utils.misc import load_object

    # A chunk's own settings: Scrapy's components and fanout's (its throttle,
    # given-up and robots.txt middlewares, its scheduler, pipeline, extension).
    settings = _settings(Spider, "WARNING")
    for name in (
        "DOWNLOADER_MIDDLEWARES_BASE",
        "SPIDER_MIDDLEWARES_BASE",
        "EXTENSIONS_BASE",
        "DOWNLOAD_HANDLERS_BASE",
        "ITEM_PIPELINES_BASE",
    ):
        components_ = settings.getdict(name)
        # Handlers map a scheme to a path; the others map a path to an order.
        paths = components_.values() if name == "DOWNLOAD_HANDLERS_BASE" else components_
        for path in paths:
            if path in UNUSED_EXTENSIONS:
                continue
            try:
                load_object(path)
            except Exception:  # an optional component whose extra is not installed
                continue
    for name in (
        "SCHEDULER",
        "SCHEDULER_PRIORITY_QUEUE",
        "SCHEDULER_MEMORY_QUEUE",
        "STATS_CLASS",
        "REQUEST_FINGERPRINTER_CLASS",
        "DOWNLOADER",
        "ITEM_PROCESSOR",
        "SPIDER_LOADER_CLASS",
        "TWISTED_DNS_RESOLVER",
    ):
        path = settings.get(name)
        if isinstance(path, str):
            with contextlib.suppress(Exception):
                load_object(path)
    # Loaded by every chunk at start-up otherwise: tens of ms a chunk.
    import codecs
    import resource  # noqa: F401

    for encoding in ("cp1252", "charmap", "latin-1"):  # w3lib's guesses for a page
        codecs.lookup(encoding)

    import scrapy.dupefilters
    import scrapy.logformatter  # noqa: F401
    import twisted.internet.asyncioreactor  # noqa: F401  (the module, not installed)

    _warm = True


def _child(
    spider_cls: type[Spider],
    spider_kwargs: dict[str, Any],
    frontier: list[dict[str, Any]] | None,
    chunk: dict[str, Any],
    write_fd: int,
) -> None:
    """The forked chunk process: crawl, report, never return."""
    code = 1
    # Everything inherited from the worker (~100,000 objects: Scrapy, Twisted,
    # fanout) lives as long as the chunk: leave it out of the collector. A full
    # collection would walk it all and, by writing each object's GC header,
    # copy every page of the worker's heap: ~80 ms a chunk, as much as Scrapy
    # needs for ten pages. (gc.freeze is O(1); the worker's own heap is untouched.)
    gc.freeze()
    try:
        with os.fdopen(write_fd, "w", buffering=1 << 16) as channel:
            channel_module.CHANNEL = channel
            try:
                # Die with the worker (a hard timeout kills the worker, not us),
                # and leave at once if it died before the wish was registered.
                ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
                if os.getppid() != chunk["worker_pid"]:
                    os._exit(1)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                CHUNK.clear()
                CHUNK.update(chunk)
                from scrapy.crawler import CrawlerProcess

                # Scrapy installs its own root log handler at LOG_LEVEL.
                logging.root.handlers.clear()
                settings = _settings(spider_cls, chunk["log_level"], chunk["closespider"])
                process = CrawlerProcess(settings)
                crawled = process.crawl(frontier_spider(spider_cls, frontier), **spider_kwargs)
                # The spider is built inside the crawl's Deferred: an exception
                # there (its __init__ raised) ended the chunk with nothing
                # crawled and no error, and the run "succeeded" with 0 records.
                failed: list[Any] = []
                crawled.addErrback(failed.append)
                process.start(install_signal_handlers=False)
                if failed:
                    send("error", failed[0].getTraceback())
                else:
                    code = 0
            except BaseException:
                send("error", traceback.format_exc())
    finally:
        os._exit(code)


def windows(time_left: float) -> tuple[float, float]:
    """How long before a chunk's soft deadline (``time_left`` s away) it stops
    taking new requests (the drain, kept for those in flight to finish) and
    cuts off (the cut, to send what is pending and leave). The drain is at
    most half of what is left: at 1 s, it was all of it, so a chunk with a
    short timeout took no request, handed its whole frontier on, and so did
    each after it until max_depth stopped the run, pages never fetched."""
    drain = min(max(1.0, 0.2 * time_left), 0.5 * time_left)
    cut = min(max(0.2, min(0.5, 0.05 * time_left)), 0.5 * drain)
    return drain, cut


def run_chunk(
    spider_cls: type[Spider],
    spider_kwargs: dict[str, Any],
    frontier: list[dict[str, Any]] | None,
    *,
    crawl: CrawlState,
    run_id: str,
    chunk_id: str,
    pages_per_chunk: int,
    time_left: float,
    log_level: str = "WARNING",
    token: str = "",
    store: Store | None = None,
    throttle_base: float = DEFAULT_THROTTLE_BASE,
    known: set[str] | None = None,
    closespider: dict[str, float] | None = None,
) -> ChunkResult:
    """Crawl one chunk in a forked process and collect what it sent.

    ``time_left`` is the time to the chunk's soft deadline: the spider stops
    taking new requests ``drain`` seconds before it, and at the cut-off, just
    before it, hands on whatever still waits for an answer. ``known``: the
    fingerprints committed chunks of the run hold, not asked of the ledger
    again (the forked chunk shares the set; it must not change it).
    ``closespider``: what is left of the spider's run-wide CLOSESPIDER_* limits
    (``fanout.crawl.limits``), the chunk's own limits.
    """
    drain, cut = windows(time_left)
    now = time.monotonic()
    chunk = {
        "run_id": run_id,
        "chunk_id": chunk_id,
        "token": token,
        "crawl": crawl,
        "store": store,
        "pages_per_chunk": pages_per_chunk,
        "close_at": now + time_left - drain,
        "cut_at": now + time_left - cut,
        # Domain leases lapse when no request of this chunk can be in flight.
        "expires": time.time() + time_left + 1.0,
        "drain": drain,
        "log_level": log_level,
        "worker_pid": os.getpid(),
        "throttle_base": throttle_base,  # a throttled domain's first back-off, run-wide
        "known": known if known is not None else set(),
        "closespider": closespider or {},
    }
    prewarm()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child never returns)
        os.close(read_fd)
        _child(spider_cls, spider_kwargs, frontier, chunk, write_fd)
    os.close(write_fd)
    result = ChunkResult()
    with os.fdopen(read_fd, "r") as pipe:
        for line in pipe:
            event = json.loads(line)
            if "item" in event:
                result.items.append(decode_value(event["item"]))
            elif "pending" in event:
                result.pending.append(event["pending"])
            elif "stats" in event:
                result.stats = event["stats"]
            elif "error" in event:
                result.errors.append(event["error"])
            elif "claims" in event:
                result.claims = [str(fp) for fp in event["claims"]]
            elif "fatal" in event:
                result.fatal.append(str(event["fatal"]))
            elif "closed" in event:
                result.closed = str(event["closed"])
            elif "given_up" in event:
                result.given_up.append(event["given_up"])
    _, status = os.waitpid(pid, 0)
    if status != 0 or (result.errors and not result.stats):
        detail = result.errors[-1].strip().splitlines()[-1] if result.errors else ""
        raise RuntimeError(
            f"crawl process of chunk {chunk_id} failed"
            f" ({_describe_status(status)}){': ' + detail if detail else ''}"
        )
    return result


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"
