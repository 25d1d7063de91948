"""The Scrapy components fanout plugs into a crawl chunk (built from settings,
as Scrapy builds its own). They run in the chunk's own process and talk to the
parent through :mod:`fanout.crawl.channel`, one JSON line per event.

- :class:`ChunkScheduler`: Scrapy's scheduler, taking requests by the claim
  rules of :mod:`fanout.crawl.claims`, sending each domain only what the
  chunk's lease allows (:mod:`fanout.crawl.politeness`), holding back domains
  that answered 429/503, and handing every request it still holds to the parent
  when the chunk closes (they become child chunks).
- :class:`ClaimOutput`: the spider middleware that claims a response's new
  links in one ledger call.
- :class:`ThrottleWatch` and :class:`ThrottleRescue`: downloader middlewares
  that mark a domain answering 429/503 as throttled (before Scrapy's retry sees
  the response, noting ``Retry-After``) and keep the request that got such an
  answer, once Scrapy's retry gave up on it, for a later chunk.
- :class:`~fanout.crawl.givenup.GiveUpWatch` (its own module): a request
  Scrapy's retry gave up on is kept, not lost.
- :class:`ParkHandedOn`: the downloader middleware nearest the downloader,
  which swallows the late answer of a request already handed on (see
  :class:`ChunkBudget`).
- :class:`ChunkBudget`: closes the spider once the chunk fetched its share of
  pages or its time runs low; in-flight requests finish first, as long as the
  chunk's time allows. At the cut-off, requests still waiting for an answer are
  handed on instead of timing out: ``DOWNLOAD_TIMEOUT`` keeps the spider's value.
- :class:`ItemSink`: the last item pipeline: items go to the parent, which
  writes them as Avro under the commit protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from typing import Any, NoReturn
from weakref import WeakSet

from itemadapter import ItemAdapter  # here, before the fork: ~100 ms to import
from scrapy import Request, Spider, signals
from scrapy.core.scheduler import Scheduler
from scrapy.exceptions import NotConfigured
from scrapy.http.request import NO_CALLBACK
from scrapy.utils.httpobj import urlparse_cached
from twisted.internet.defer import Deferred

import fanout.crawl.channel as channel  # the module: CHANNEL is set per chunk
from fanout.crawl.backoff import OWN_FAILURE_META, OWN_FAILURES
from fanout.crawl.channel import CHUNK, InChunk, send
from fanout.crawl.claims import ClaimBatch, book_of
from fanout.crawl.closing import SPIDER_CLOSED, spider_closed_itself
from fanout.crawl.codec import CodecError, check_keepable, encode_value, request_to_json
from fanout.crawl.limits import REASONS
from fanout.crawl.politeness import (  # the in-flight marks: re-exported, used here
    CUT_MARGIN,
    IN_FLIGHT_META,
    MAX_IN_FLIGHT_HAND_ONS,
    DomainGate,
    in_flight_hand_ons,
)
from fanout.crawl.stats import summarize_stats

__all__ = [
    "CHUNK",
    "CUT_MARGIN",
    "IN_FLIGHT_META",
    "MAX_IN_FLIGHT_HAND_ONS",
    "in_flight_hand_ons",
    "send",
]

logger = logging.getLogger(__name__)

#: Meta key keeping the request's own ``download_timeout`` while a shorter one
#: (:class:`ParkHandedOn`) is in force.
OWN_TIMEOUT_META = "fanout_download_timeout"


def domain_of(request: Request) -> str:
    return urlparse_cached(request).hostname or ""


def gate_of(crawler: Any) -> DomainGate:
    """The chunk's domain leases (one per chunk process)."""
    gate = CHUNK.get("gate")
    if gate is None:
        gate = DomainGate(crawler, CHUNK)
        CHUNK["gate"] = gate
    return gate


def give_up(reason: str) -> NoReturn:
    """End the chunk's attempt as a permanent error (the spider cannot be
    crawled in chunks as it is): the parent buries the chunk with ``reason``."""
    send("fatal", reason)
    _let_sites_go()
    budget: ChunkBudget | None = CHUNK.get("budget")
    if budget is not None:
        budget.leave()  # the stats and claims, then exits
    assert channel.CHANNEL is not None
    channel.CHANNEL.flush()
    os._exit(0)


def fail_chunk(reason: str) -> NoReturn:
    """End the chunk's attempt as an ordinary failure, retried within the run's
    ``max_attempts`` like any other: the parent raises with ``reason``. For a
    chunk that has fetched and claimed nothing (its leases are let go)."""
    send("error", reason)
    _let_sites_go()
    assert channel.CHANNEL is not None
    channel.CHANNEL.flush()
    os._exit(1)


def _let_sites_go() -> None:
    """Release the chunk's domain leases as it leaves early: the process ends
    now, its requests with it, and its leases must not hold other chunks off
    the sites until they lapse (a chunk timeout)."""
    gate: DomainGate | None = CHUNK.get("gate")
    if gate is not None:
        with contextlib.suppress(Exception):
            gate.release()


class ChunkScheduler(Scheduler):
    """Scrapy's scheduler under the chunk's claims, leases and throttles."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[Request] = []  # throttled domains: for a later chunk
        self.parked: list[Request] = []  # domains whose lease another chunk holds
        self.waiting: dict[str, list[Request]] = {}  # domains whose slots are all in flight
        self.throttled: set[str] = set()
        #: Throttled because the site is away, not asking to slow down (throttle.py).
        self.away: set[str] = set()
        self.retry_after: dict[str, float] = {}  # per throttled domain, seconds
        self.handed_on = False
        self.parking_until = 0.0  # monotonic: parked requests keep the spider open until then
        crawler = self.crawler
        assert crawler is not None
        self.book = book_of(crawler)
        self.gate = gate_of(crawler)

    def enqueue_request(self, request: Request) -> bool:
        if not self.book.admit(request):
            return False  # a duplicate: Scrapy signals request_dropped
        try:
            # Now, not when it is handed on: whether a request reaches a chunk
            # boundary is chance (the chunk's size, the site's speed), and one
            # that cannot cross it would be lost with its claim held.
            check_keepable(request, CHUNK["spider"])
        except CodecError as exc:
            give_up(f"{exc}: it cannot be handed on to another chunk")
        if self.handed_on:
            # Found after the hand-off (a late answer's links): not lost, handed on too.
            self._send_pending(request)
            return True
        return bool(super().enqueue_request(request))

    def next_request(self) -> Request | None:
        if CHUNK.get("closing"):
            return None  # the chunk has its share of pages: the rest is handed on
        budget: ChunkBudget | None = CHUNK.get("budget")
        if budget is not None and budget.spent():
            # What is in flight makes up the chunk's share: sending more would
            # fetch pages past it (if some fail, their answers ask again).
            return None
        if self.parked and not self.handed_on:
            self._unpark()
        if self.waiting:
            self._unwait()
        while True:
            request = super().next_request()
            if request is None:
                return None
            domain = domain_of(request)
            if domain in self.throttled:
                self.held.append(request)  # spare the site: a later chunk, after back-off
            elif not self.gate.allows(request):
                if domain in self.throttled:
                    self.held.append(request)  # the run backs the site off: a later chunk
                else:
                    self.parked.append(request)  # another chunk holds the domain
            elif not self.gate.has_room(request):
                # The domain's slots are all in flight. Scrapy 2.19's downloader
                # counts a request against its slot only once its download task
                # has started, so without a delay it would send the whole queue.
                self.waiting.setdefault(self.gate.key(request), []).append(request)
            else:
                return request

    def _unwait(self) -> None:
        """Requests set aside for a full domain go back once it has room."""
        for key, requests in list(self.waiting.items()):
            room = self.gate.room(key)
            if room <= 0:
                continue
            for request in requests[:room]:
                self._mqpush(request)
            rest = requests[room:]
            if rest:
                self.waiting[key] = rest
            else:
                del self.waiting[key]

    def _unpark(self) -> None:
        """Parked requests go back into the queue once their domain may be asked
        again, until the chunk stops waiting for domains (then they are handed on)."""
        now = time.monotonic()
        if now >= self.parking_until:
            return
        waiting: list[Request] = []
        for request in self.parked:
            if now >= self.gate.ask_after.get(self.gate.key(request), 0.0):
                self._mqpush(request)
            else:
                waiting.append(request)
        self.parked = waiting

    def has_pending_requests(self) -> bool:
        # Held requests do not keep the spider open: they go to the parent. Parked
        # ones do for a while (the domain's holder may finish soon), then go too.
        if self.parked and time.monotonic() < self.parking_until:
            return True
        return bool(self.waiting) or bool(super().has_pending_requests())

    def close(self, reason: str) -> Any:
        # A spider that raised CloseSpider ends the crawl, its queue dropped as
        # in Scrapy (and the run, see CloseWatch), and so does a CLOSESPIDER_*
        # limit counted run-wide (fanout.crawl.limits); any other close is the
        # chunk's alone (its share fetched, its time up, Scrapy's memory limit,
        # CLOSESPIDER_*_NO_ITEM): the crawl goes on.
        if reason in REASONS:
            spider_closed_itself(reason)
        if SPIDER_CLOSED not in CHUNK:
            self.hand_on()
        return super().close(reason)

    def hand_on(self, extra: Iterable[Request] = ()) -> None:
        """Send every request this chunk still holds (and ``extra``) to the parent, once."""
        if self.handed_on:
            return
        self.handed_on = True
        waiting = [r for requests in self.waiting.values() for r in requests]
        self.waiting.clear()
        pending = [*self.held, *self.parked, *waiting, *extra]
        while (request := super().next_request()) is not None:
            pending.append(request)
        for request in pending:
            self._send_pending(request)

    def _send_pending(self, request: Request) -> None:
        spider = CHUNK["spider"]
        if request.url in CHUNK.get(OWN_FAILURES, ()):
            request.meta[OWN_FAILURE_META] = True  # a broken page (fanout.crawl.throttle)
        try:
            data = request_to_json(request, spider)
        except (CodecError, ValueError) as exc:
            # Claimed, so no other chunk will fetch it: never drop it quietly.
            give_up(f"pending request {request.url} cannot be handed on: {exc}")
        domain = domain_of(request)
        entry: dict[str, Any] = {"request": data, "throttled": domain in self.throttled}
        if domain in self.away:
            entry["away"] = True
        if domain in self.retry_after:
            entry["retry_after"] = self.retry_after[domain]
        send("pending", entry)


class ClaimOutput(ClaimBatch):
    """:class:`~fanout.crawl.claims.ClaimBatch` built from the crawler."""

    def __init__(self, crawler: Any) -> None:
        if not CHUNK:
            raise NotConfigured
        super().__init__(book_of(crawler))

    @classmethod
    def from_crawler(cls, crawler: Any) -> ClaimOutput:
        return cls(crawler)


class ParkHandedOn(InChunk):
    """Downloader middleware nearest the downloader: the answer to a request the
    chunk already handed on (at its cut-off) never reaches the spider, so the
    page is parsed once, by the chunk that has it now. It also notes every
    request whose answer got past it: such a request may sit in the
    downloader's active set a moment longer, but is not in flight any more."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        # Weak: a request's id may be reused once it is gone.
        self.handed_on: WeakSet[Request] = CHUNK.setdefault("handed_on", WeakSet())
        self.answered: WeakSet[Request] = CHUNK.setdefault("answered", WeakSet())

    def process_request(self, request: Request, spider: Spider | None = None) -> None:
        """A request already handed on in flight ``MAX_IN_FLIGHT_HAND_ONS`` times
        in a row must answer before this chunk's cut-off, or time out; a later
        attempt (Scrapy's retry copies meta) gets its own timeout back."""
        meta = request.meta
        hand_ons = in_flight_hand_ons(meta)
        if not hand_ons:
            if OWN_TIMEOUT_META in meta:
                meta["download_timeout"] = meta.pop(OWN_TIMEOUT_META)
            return
        budget: ChunkBudget | None = CHUNK.get("budget")
        if budget is None or hand_ons < MAX_IN_FLIGHT_HAND_ONS:
            return
        own = meta.setdefault(OWN_TIMEOUT_META, meta.get("download_timeout"))
        left = max(0.05, budget.cut_at - time.monotonic() - CUT_MARGIN)
        if own is None or left < float(own):
            meta["download_timeout"] = left
            stats = self.crawler.stats
            stats.inc_value("fanout/in_flight_timeouts")
            logger.warning(
                "%s has not answered within a chunk's time budget %d times in a row:"
                " it must answer in %.1f s or time out (a page slower than a chunk"
                " needs a longer --chunk-timeout)",
                request.url,
                hand_ons,
                left,
            )

    async def process_response(
        self, request: Request, response: Any, spider: Spider | None = None
    ) -> Any:
        if request in self.handed_on:
            await Deferred()  # never fires: the process exits first
        self.answered.add(request)
        return response

    async def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> Any:
        if request in self.handed_on:
            await Deferred()
        self.answered.add(request)
        return None


class ChunkBudget(InChunk):
    """Closes the spider when the chunk has fetched ``pages`` responses or its
    soft deadline minus the drain time is near; at the cut-off (just before the
    soft deadline) hands on what is still in flight and leaves."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        self.pages = 0
        self.limit = int(CHUNK["pages_per_chunk"])
        self.close_at = float(CHUNK["close_at"])  # time.monotonic()
        self.cut_at = float(CHUNK.get("cut_at", self.close_at + float(CHUNK["drain"])))
        self.closing = False
        self.cut = False
        self.book = book_of(crawler)
        self.gate = gate_of(crawler)
        CHUNK["budget"] = self
        crawler.signals.connect(self.response_received, signal=signals.response_received)
        crawler.signals.connect(self.spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self.engine_stopped, signal=signals.engine_stopped)
        self.timer: Any = None

    def spider_opened(self, spider: Spider) -> None:
        from twisted.internet import task

        scheduler = self.crawler.engine.scheduler
        # A chunk waits for a domain another chunk holds at most 2/3 of its time.
        left = max(0.0, self.close_at - time.monotonic())
        scheduler.parking_until = time.monotonic() + left * 2 / 3
        self.timer = task.LoopingCall(self.check, spider)
        self.timer.start(0.1, now=False)

    def spider_closed(self, spider: Spider) -> None:
        if self.timer is not None and self.timer.running:
            self.timer.stop()
        if not self.cut:
            self.gate.release()  # nothing in flight any more

    def engine_stopped(self) -> None:
        """Everything the parent needs has been sent: report and leave now.
        The reactor's graceful teardown (closing keep-alive connections, joining
        thread pools) cost ~0.5 s per chunk and a chunk process keeps nothing."""
        self.leave()

    def leave(self) -> None:
        """Send the stats and exit the chunk process."""
        stats = self.crawler.stats
        # What the crawl state's calls cost, where it counts (DynamoDB).
        for unit, value in CHUNK["crawl"].usage.items():
            stats.set_value(f"fanout/ledger_{unit}", value)
        # Before the stats: the parent reads every line up to the end.
        send("claims", sorted(self.book.won))
        send("stats", summarize_stats(stats.get_stats()))
        assert channel.CHANNEL is not None
        channel.CHANNEL.flush()
        os._exit(0)

    def response_received(self, response: Any, request: Request, spider: Spider) -> None:
        self.book.answer(request)
        self.gate.answered(request)
        domain = domain_of(request)
        stats = self.crawler.stats
        stats.inc_value(f"fanout/domain/{domain}/pages")
        stats.inc_value(f"fanout/domain/{domain}/status/{response.status}")
        self.pages += 1
        # Requests in flight will answer too: stop scheduling once they make up
        # the chunk's share, so a chunk fetches pages_per_chunk, not 16 more.
        if self.spent():
            self.close(spider, "fanout_pages")

    def spent(self) -> bool:
        """Whether the pages fetched and the requests in flight make up the chunk's share."""
        return self.pages + len(self.crawler.engine.downloader.active) >= self.limit

    def check(self, spider: Spider) -> None:
        now = time.monotonic()
        if now >= self.cut_at:
            self.cut_off()
        elif now >= self.close_at:
            self.close(spider, "fanout_deadline")
        elif not self.closing:
            self.gate.renew()
            scheduler = self.crawler.engine.scheduler
            if scheduler.parked or scheduler.waiting:
                # Nothing else wakes the engine when all it holds waits for a
                # domain (its own heartbeat is every 5 s): ask the scheduler again.
                self.crawler.engine._slot.nextcall.schedule()

    def close(self, spider: Spider, reason: str) -> None:
        if not self.closing:
            self.closing = True
            CHUNK["closing"] = True  # at once: Scrapy's own close starts on the next tick
            from scrapy.utils.defer import deferred_from_coro

            deferred_from_coro(self.crawler.engine.close_spider_async(reason=reason))

    def cut_off(self) -> None:
        """Time is up: requests still waiting for an answer are handed on (their
        late answers are swallowed by :class:`ParkHandedOn`); responses already
        being parsed finish; then the chunk leaves."""
        if self.cut:
            return
        self.cut = True
        engine = self.crawler.engine
        parked: WeakSet[Request] = CHUNK.setdefault("handed_on", WeakSet())
        answered: WeakSet[Request] = CHUNK.setdefault("answered", WeakSet())
        # Not robots.txt fetches (Scrapy's own, callback-less): a page waiting
        # for its site's robots.txt is handed on itself. Not requests whose
        # answer is already on its way to the spider either.
        in_flight = [
            r
            for r in engine.downloader.active
            if r not in parked and r not in answered and r.callback is not NO_CALLBACK
        ]
        parked.update(in_flight)
        for request in in_flight:
            meta = request.meta
            meta[IN_FLIGHT_META] = [meta.get("retry_times", 0), in_flight_hand_ons(meta) + 1]
        self.crawler.stats.inc_value("fanout/handed_on_in_flight", len(in_flight))
        engine.scheduler.hand_on(in_flight)
        # The leases are not let go: requests handed on may still be in flight
        # at the site; they lapse a moment after the soft deadline.
        from twisted.internet import task

        def finish() -> None:
            # Responses being parsed finish first, however long they take: a
            # page half parsed would lose the links it has not yielded yet. A
            # callback that never ends meets the hard timeout, and the attempt
            # is retried whole. So do answers on their way to the scraper (past
            # the downloader's middlewares, not yet handed to it: an event loop
            # turn apart), which is_idle() does not see: a chunk that left then
            # lost the page, neither parsed nor handed on.
            if engine.scraper.slot.is_idle() and not on_their_way():
                self.leave()

        def on_their_way() -> bool:
            slot = engine._slot
            return slot is not None and any(
                r not in parked and r.callback is not NO_CALLBACK for r in slot.inprogress
            )

        task.LoopingCall(finish).start(0.02)


class ItemSink:
    """The last pipeline: send each item to the parent, which writes the Avro."""

    def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        send("item", encode_value(ItemAdapter(item).asdict(), "item"))
        return item
