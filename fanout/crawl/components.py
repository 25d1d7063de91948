"""The Scrapy components fanout plugs into a crawl chunk (built from settings,
as Scrapy builds its own). They run in the chunk's own process and talk to the
parent through :data:`CHANNEL`, one JSON line per event.

- :class:`LedgerDupeFilter`: run-wide de-duplication through the ledger's
  seen-set (the chunk's own frontier is pre-approved: its parent claimed it).
- :class:`ChunkScheduler`: Scrapy's scheduler, which also holds back requests
  to a domain that answered 429/503, and hands every request it still holds to
  the parent when the chunk closes (they become child chunks).
- :class:`ThrottleWatch` and :class:`ThrottleRescue`: downloader middlewares
  that mark a domain answering 429/503 as throttled (before Scrapy's retry sees
  the response) and keep the request that got such an answer, once Scrapy's
  retry gave up on it, for a later chunk instead of dropping it.
- :class:`ChunkBudget`: closes the spider once the chunk fetched its share of
  pages or its time runs low; in-flight requests finish first.
- :class:`ItemSink`: the last item pipeline: items go to the parent, which
  writes them as Avro under the commit protocol.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

from scrapy import Request, Spider, signals
from scrapy.core.scheduler import Scheduler
from scrapy.dupefilters import BaseDupeFilter
from scrapy.exceptions import NotConfigured
from scrapy.utils.httpobj import urlparse_cached

from fanout.crawl.codec import encode_value

#: The pipe to the parent process, set by the chunk's entry point.
CHANNEL: IO[str] | None = None
#: The chunk's context: run id, chunk id, frontier fingerprints, deadlines, ledger.
CHUNK: dict[str, Any] = {}


def send(kind: str, value: Any) -> None:
    """One event to the parent."""
    assert CHANNEL is not None, "not inside a fanout crawl chunk"
    CHANNEL.write(json.dumps({kind: value}, separators=(",", ":")) + "\n")


def domain_of(request: Request) -> str:
    return urlparse_cached(request).hostname or ""


class LedgerDupeFilter(BaseDupeFilter):
    """A request is new if no chunk of the run has claimed its fingerprint."""

    def __init__(self, fingerprinter: Any, stats: Any) -> None:
        self.fingerprinter = fingerprinter
        self.stats = stats
        self.local: set[str] = set()
        # Filled by the chunk's spider as it schedules its frontier.
        self.frontier: set[str] = CHUNK.setdefault("frontier_fps", set())

    @classmethod
    def from_crawler(cls, crawler: Any) -> LedgerDupeFilter:
        return cls(crawler.request_fingerprinter, crawler.stats)

    def fingerprint(self, request: Request) -> str:
        fp: bytes = self.fingerprinter.fingerprint(request)
        return fp.hex()

    def log(self, request: Request, spider: Spider) -> None:
        """Duplicates are counted in the stats, not logged one by one."""

    def request_seen(self, request: Request) -> bool:
        fp = self.fingerprint(request)
        if fp in self.local:
            self.stats.inc_value("fanout/dupes_chunk")
            return True
        self.local.add(fp)
        if fp in self.frontier:
            return False  # handed to this chunk by its parent, which claimed it
        ledger = CHUNK["ledger"]
        if fp in ledger.claim_urls(CHUNK["run_id"], CHUNK["chunk_id"], [fp]):
            return False
        self.stats.inc_value("fanout/dupes_run")
        return True


class ChunkScheduler(Scheduler):
    """Holds back throttled domains; gives up its queue when the chunk closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[Request] = []
        self.throttled: set[str] = set()

    def next_request(self) -> Request | None:
        while True:
            request = super().next_request()
            if request is None or domain_of(request) not in self.throttled:
                return request
            self.held.append(request)  # spare the site: a later chunk, after back-off

    def has_pending_requests(self) -> bool:
        # Held requests do not keep the spider open: they go to the parent.
        return bool(super().has_pending_requests())

    def close(self, reason: str) -> Any:
        pending = list(self.held)
        while (request := super().next_request()) is not None:
            pending.append(request)
        spider = CHUNK["spider"]
        from fanout.crawl.codec import CodecError, request_to_json

        for request in pending:
            try:
                data = request_to_json(request, spider)
            except (CodecError, ValueError) as exc:
                send("error", f"pending request {request.url} cannot be kept: {exc}")
                continue
            send("pending", {"request": data, "throttled": domain_of(request) in self.throttled})
        return super().close(reason)


#: The statuses by which a site asks a crawler to slow down.
THROTTLE_STATUSES = (429, 503)
#: A request is handed on with back-off at most this many times for 429/503
#: answers; after that its last answer goes to the spider as Scrapy would.
MAX_THROTTLE_LEVEL = 8


class ThrottleWatch:
    """Downloader middleware, just above Scrapy's retry: a 429/503 answer marks
    its domain as throttled, so that the retry Scrapy schedules (and every other
    request to that domain) is held back for a later chunk, not sent at once."""

    def __init__(self, crawler: Any) -> None:
        if not CHUNK:
            raise NotConfigured
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> ThrottleWatch:
        return cls(crawler)

    def process_response(
        self, request: Request, response: Any, spider: Spider | None = None
    ) -> Any:
        if response.status in THROTTLE_STATUSES:
            self.crawler.engine.scheduler.throttled.add(domain_of(request))
            self.crawler.stats.inc_value("fanout/throttled")
        return response


class ThrottleRescue:
    """Downloader middleware, nearest the engine: a 429/503 answer that got
    through Scrapy's retry (``RETRY_TIMES`` spent, or retry off) would be dropped
    as an HTTP error; instead its request is scheduled again, is held back (its
    domain is throttled) and goes to a later chunk, after a back-off. Not when
    the spider asked to see such answers (``handle_httpstatus_list``), nor after
    ``MAX_THROTTLE_LEVEL`` back-offs."""

    def __init__(self, crawler: Any) -> None:
        if not CHUNK:
            raise NotConfigured
        self.crawler = crawler
        settings = crawler.settings
        self.allow_all = settings.getbool("HTTPERROR_ALLOW_ALL")
        self.allowed = set(settings.getlist("HTTPERROR_ALLOWED_CODES"))

    @classmethod
    def from_crawler(cls, crawler: Any) -> ThrottleRescue:
        return cls(crawler)

    def _spider_wants(self, request: Request, status: int, spider: Spider | None) -> bool:
        meta = request.meta
        if meta.get("handle_httpstatus_all", False):
            return True
        if "handle_httpstatus_list" in meta:
            return status in meta["handle_httpstatus_list"]
        if self.allow_all:
            return True
        return status in self.allowed or status in getattr(spider, "handle_httpstatus_list", ())

    def process_response(
        self, request: Request, response: Any, spider: Spider | None = None
    ) -> Any:
        from fanout.crawl import THROTTLE_META

        if response.status not in THROTTLE_STATUSES:
            return response
        spider = spider or getattr(self.crawler, "spider", None)
        if self._spider_wants(request, response.status, spider):
            return response
        if int(request.meta.get(THROTTLE_META, 0)) >= MAX_THROTTLE_LEVEL:
            self.crawler.stats.inc_value("fanout/throttle_gave_up")
            return response
        self.crawler.stats.inc_value("fanout/throttle_kept")
        # Already seen by the dupe filter: only dont_filter gets it scheduled again.
        return request.replace(dont_filter=True)


class ChunkBudget:
    """Closes the spider when the chunk has fetched ``pages`` responses or its
    soft deadline minus the drain time is near."""

    def __init__(self, crawler: Any) -> None:
        if not CHUNK:
            raise NotConfigured
        self.crawler = crawler
        self.pages = 0
        self.limit = int(CHUNK["pages_per_chunk"])
        self.close_at = float(CHUNK["close_at"])  # time.monotonic()
        self.closing = False
        crawler.signals.connect(self.response_received, signal=signals.response_received)
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self.engine_stopped, signal=signals.engine_stopped)
        self.timer: Any = None

    @classmethod
    def from_crawler(cls, crawler: Any) -> ChunkBudget:
        return cls(crawler)

    def spider_opened(self, spider: Spider) -> None:
        from twisted.internet import task

        self.timer = task.LoopingCall(self.check, spider)
        self.timer.start(0.1, now=False)

    def spider_closed(self, spider: Spider) -> None:
        if self.timer is not None and self.timer.running:
            self.timer.stop()

    def engine_stopped(self) -> None:
        """Everything the parent needs has been sent: report and leave now.
        The reactor's graceful teardown (closing keep-alive connections, joining
        thread pools) cost ~0.5 s per chunk and a chunk process keeps nothing."""
        send("stats", summarize_stats(self.crawler.stats.get_stats()))
        assert CHANNEL is not None
        CHANNEL.flush()
        os._exit(0)

    def response_received(self, response: Any, request: Request, spider: Spider) -> None:
        self.pages += 1
        if self.pages >= self.limit:
            self.close(spider, "fanout_pages")

    def check(self, spider: Spider) -> None:
        if time.monotonic() >= self.close_at:
            self.close(spider, "fanout_deadline")

    def close(self, spider: Spider, reason: str) -> None:
        if not self.closing:
            self.closing = True
            from scrapy.utils.defer import deferred_from_coro

            deferred_from_coro(self.crawler.engine.close_spider_async(reason=reason))


def summarize_stats(stats: dict[str, Any]) -> dict[str, int]:
    """The crawl counters fanout keeps per run (``fanout status``)."""
    out: dict[str, int] = {
        "pages": int(stats.get("response_received_count", 0)),
        "duplicates": int(stats.get("fanout/dupes_chunk", 0) + stats.get("fanout/dupes_run", 0)),
        "http_retries": int(stats.get("retry/count", 0)),
        "download_errors": int(stats.get("downloader/exception_count", 0)),
        "throttled": int(stats.get("fanout/throttled", 0)),
        "throttle_gave_up": int(stats.get("fanout/throttle_gave_up", 0)),
        "callback_errors": sum(
            int(v) for k, v in stats.items() if k.startswith("spider_exceptions/")
        ),
    }
    prefix = "downloader/response_status_count/"
    for key, value in stats.items():
        if key.startswith(prefix):
            out["status/" + key[len(prefix) :]] = int(value)
    return {k: v for k, v in out.items() if v}


class ItemSink:
    """The last pipeline: send each item to the parent, which writes the Avro."""

    def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        from itemadapter import ItemAdapter

        send("item", encode_value(ItemAdapter(item).asdict(), "item"))
        return item
