"""Run-wide politeness: many chunks on many workers crawl a site as one polite
Scrapy process would.

Scrapy keeps ``CONCURRENT_REQUESTS_PER_DOMAIN``, ``DOWNLOAD_DELAY`` and
AutoThrottle per process. A chunk therefore sends nothing to a domain (a
Scrapy download slot: the host name) before it holds a lease on some of the
domain's slots in the ledger (:func:`fanout.backends.crawlstate.grant_domain`):

- no delay: the domain's slots are shared by the chunks crawling it, each
  getting an even share, so the site never sees more than the setting in
  flight; a chunk asks again every quarter second while it shares a domain, so a
  newcomer gets its share as soon as the others' requests finish;
- a delay (``DOWNLOAD_DELAY``, AutoThrottle's start delay, or robots.txt's
  ``Crawl-delay``): one chunk holds the whole domain and starts no sooner than
  the delay after the previous holder let it go.

Leases are let go when the chunk closes and lapse at its hard timeout.

robots.txt (``ROBOTSTXT_OBEY``) is fetched once per domain per run: the first
chunk keeps it in the store, beside the run, and every other chunk reads it
from there. Two chunks that meet a site at the same moment (the domain's slots
shared between them) do not both fetch it: the fetch is claimed in the run's
seen-set, and a chunk that lost the claim waits for the file in the store (up
to :data:`ROBOTS_WAIT`, then fetches it itself: the other chunk may have been
cut off before the answer came). Its ``Crawl-delay`` is honoured (Scrapy's own
middleware ignores it). A robots.txt that does not answer within a chunk is
not waited for chunk after chunk: the pages waiting for it are handed on in
flight (``IN_FLIGHT_META``), the next chunk fetches the file itself, and after
:data:`MAX_IN_FLIGHT_HAND_ONS` such chunks the fetch must end before the
chunk's cut-off; if it does not, the site's robots.txt is unavailable for the
run (everything allowed, as Scrapy does when it cannot fetch one).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from scrapy import Request
from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware
from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.http.request import NO_CALLBACK
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import build_from_crawler
from twisted.internet.defer import Deferred

from fanout.backends.crawlstate import CrawlState, DomainAsk, DomainGrant
from fanout.backends.keys import robots_key
from fanout.crawl.channel import CHUNK
from fanout.crawl.claims import book_of

#: Seconds between two lease requests for a domain this chunk may not use yet.
ASK_EVERY = 0.25
#: Seconds between renewals of a shared domain's lease: how long a newcomer
#: waits, at most, before a holder trims itself to a fair share. Chunks follow
#: one another on every worker, so a newcomer is the rule: its wait is a
#: worker's idle time (a quarter of a second costs a 2 s chunk ~10%).
RENEW_EVERY = 0.25
#: Requests a chunk opens to a domain at first; one more for each answer, up to
#: its lease. Every chunk is a new process with no connections yet: 16 at once
#: overflow a small listen backlog, and a dropped SYN is retried only after 1 s.
RAMP_START = 4
#: A back-off the run was told of is not told again for an end at most this
#: much later (s): a longer ``Retry-After`` is.
BACKOFF_TOLD_SLACK = 1.0
#: How long a chunk waits for a robots.txt another chunk claimed to fetch (s)
#: before it fetches the file itself.
ROBOTS_WAIT = 10.0
#: Seconds between two looks in the store for that file.
ROBOTS_POLL = 0.1
#: Meta key ``[retry_times, n]``: this attempt of the request was handed on
#: still waiting for its answer ``n`` times in a row (a chunk's cut-off). A
#: page waiting for its site's robots.txt is one of them.
IN_FLIGHT_META = "fanout_in_flight"
#: An attempt handed on in flight this many times gets, in the next chunk, a
#: download timeout that ends before that chunk's cut-off: a page slower than a
#: chunk's time budget then times out and is retried or given up as Scrapy does,
#: instead of being handed on for ever. So does the robots.txt such a page
#: waits for (:class:`SharedRobotsTxt`).
MAX_IN_FLIGHT_HAND_ONS = 2
#: Seconds before the cut-off at which such a shortened timeout ends.
CUT_MARGIN = 0.3
#: The share of a chunk's time left that a bounded robots.txt fetch may take:
#: the page that waited for it needs the rest.
ROBOTS_SHARE = 0.5


def in_flight_hand_ons(meta: dict[str, Any]) -> int:
    """How many chunks in a row handed this attempt of the request on in flight
    (``IN_FLIGHT_META``; 0 when the mark is of an earlier attempt, or absent)."""
    mark = meta.get(IN_FLIGHT_META)
    if isinstance(mark, list) and mark[:1] == [meta.get("retry_times", 0)]:
        return int(mark[1])
    return 0


def note_frontier(request: Request) -> None:
    """Keep, per netloc, the most chunks in a row a request of the chunk's
    frontier was handed on in flight (:func:`in_flight_hand_ons`): whichever of
    the site's requests the chunk sends first, its robots.txt fetch is bounded
    by the one that has waited longest (:class:`SharedRobotsTxt`)."""
    waited: dict[str, int] = CHUNK.setdefault("waited", {})
    netloc = urlparse_cached(request).netloc
    waited[netloc] = max(waited.get(netloc, 0), in_flight_hand_ons(request.meta))


def robots_fingerprint(netloc: str) -> str:
    """The seen-set entry that claims the run's one fetch of ``netloc``'s
    robots.txt: hex, like a request's fingerprint, but of a text no request has."""
    return hashlib.sha1(f"fanout robots.txt {netloc}".encode()).hexdigest()


class DomainGate:
    """The chunk's leases on the domains it crawls."""

    def __init__(self, crawler: Any, chunk: dict[str, Any]) -> None:
        settings = crawler.settings
        self.crawler = crawler
        self.crawl: CrawlState = chunk["crawl"]
        self.run_id: str = chunk["run_id"]
        self.holder: str = chunk["chunk_id"]
        self.expires: float = chunk["expires"]  # wall clock: the hard timeout
        self.capacity = max(1, settings.getint("CONCURRENT_REQUESTS_PER_DOMAIN"))
        delay = settings.getfloat("DOWNLOAD_DELAY")
        if settings.getbool("AUTOTHROTTLE_ENABLED"):
            delay = max(delay, settings.getfloat("AUTOTHROTTLE_START_DELAY"))
        self.delay = delay
        self.crawl_delay: dict[str, float] = {}  # robots.txt, per domain
        self.slots: dict[str, int] = {}  # granted, per domain
        self.ask_after: dict[str, float] = {}  # monotonic
        self.ramp: dict[str, int] = {}  # requests allowed in flight while connections open
        self.renewed = time.monotonic()
        self.over: set[str] = set()  # trimmed below what it has in flight: charged for it
        self.backoff_told: dict[str, float] = {}  # wall clock, per domain: told the run
        #: Wall clock, per domain: this chunk's last good answer, and the run's
        #: latest as the last grant said (fanout.crawl.throttle: broken pages).
        self.good_at: dict[str, float] = {}
        self.run_good_at: dict[str, float] = {}

    def key(self, request: Request) -> str:
        """The domain of ``request`` as Scrapy's downloader keys its slots."""
        downloader = self.crawler.engine.downloader
        key: str = downloader.get_slot_key(request)
        return key

    def delay_of(self, key: str) -> float:
        """The domain's delay between requests: the spider's, or robots.txt's."""
        return max(float(self.delay), float(self.crawl_delay.get(key, 0.0)))

    def allows(self, request: Request) -> bool:
        """Whether the chunk may send ``request`` now (asking the ledger at most
        every :data:`ASK_EVERY` seconds per domain)."""
        key = self.key(request)
        if self.slots.get(key, 0) > 0:
            return True
        now = time.monotonic()
        if now < self.ask_after.get(key, 0.0):
            return False
        grant = self._ask(key, self.capacity)
        if grant.slots <= 0:
            self.ask_after[key] = now + max(grant.retry_after, ASK_EVERY)
            return False
        self._apply(key, grant)
        # Backed off run-wide: the lease is kept, the request is not sent.
        return grant.backoff_until <= time.time()

    def room(self, key: str) -> int:
        """How many more requests the chunk may have in flight to ``key``:
        counted from the moment the engine hands a request to the downloader
        (its slot learns of it only after the downloader middlewares)."""
        return min(self.slots.get(key, 0), self.ramp.get(key, RAMP_START)) - self._busy(key)

    def answered(self, request: Request) -> None:
        """A response from ``request``'s domain: a connection is open, one more may be.
        A holder trimmed to a share smaller than what it had in flight is charged
        for what it had until it says otherwise: it does, once its requests fit
        its share, so the newcomer waiting for the rest gets it at its next ask."""
        key = self.key(request)
        self.ramp[key] = self.ramp.get(key, RAMP_START) + 1
        if key in self.over and self._busy(key) <= self.slots.get(key, 0):
            busy = self._busy(key)
            self._apply(key, self._ask(key, self.capacity, in_use=busy), busy)

    def site_answered(self, request: Request) -> None:
        """A good answer from ``request``'s site (not a gateway's or a throttle's):
        told the run with this chunk's next ask of the domain."""
        self.good_at[self.key(request)] = time.time()

    def answered_since(self, request: Request, since: float) -> bool:
        """Whether ``request``'s site gave any chunk of the run a good answer
        after ``since`` (wall clock), as far as this chunk has heard."""
        key = self.key(request)
        return max(self.good_at.get(key, 0.0), self.run_good_at.get(key, 0.0)) > since

    def _busy(self, key: str) -> int:
        """Requests of the chunk to ``key`` that have not been answered yet."""
        downloader = self.crawler.engine.downloader
        return sum(1 for r in downloader.active if downloader.get_slot_key(r) == key)

    def has_room(self, request: Request) -> bool:
        """Whether one more request to ``request``'s domain stays within the lease."""
        return self.room(self.key(request)) > 0

    def _ask(self, key: str, want: int, in_use: int = 0, backoff_until: float = 0.0) -> DomainGrant:
        self.crawler.stats.inc_value("fanout/ledger_lease_calls")
        now = time.time()
        ask = DomainAsk(
            capacity=self.capacity,
            delay=self.delay_of(key),
            want=want,
            expires=self.expires,
            now=now,
            in_use=in_use,
            backoff_until=backoff_until,
            answered_at=self.good_at.get(key, 0.0),
        )
        grant: DomainGrant = self.crawl.lease_domain(self.run_id, key, self.holder, ask)
        if grant.answered_at:
            self.run_good_at[key] = max(grant.answered_at, self.run_good_at.get(key, 0.0))
        if want > 0 and grant.backoff_until > now:  # (letting go, the chunk is closing)
            self._backed_off(key, grant.backoff_until - now)
        return grant

    def _backed_off(self, key: str, wait: float) -> None:
        """The domain is backed off run-wide for ``wait`` more seconds (this chunk,
        or another, was told to slow down): this chunk sends it nothing new and
        hands its requests on, to start no sooner than that."""
        scheduler = self.crawler.engine.scheduler
        scheduler.throttled.add(key)
        scheduler.retry_after[key] = max(wait, scheduler.retry_after.get(key, 0.0))

    def back_off(self, key: str, until: float) -> None:
        """The site answered 429/503: every chunk backs off ``key`` until ``until``
        (wall clock), kept in the domain's lease for the others to see when they
        next ask (at most :data:`RENEW_EVERY` seconds later for a shared domain)."""
        if until <= self.backoff_told.get(key, 0.0) + BACKOFF_TOLD_SLACK:
            # The run knows already (the answers of requests that were in flight
            # when the first came): one ledger call per back-off, not per answer.
            return
        self.backoff_told[key] = until
        downloader = self.crawler.engine.downloader
        slot = downloader.slots.get(key)
        in_use = len(slot.active) if slot is not None else 0
        held = self.slots.get(key, 0)
        # Asking for what it holds keeps the lease as it is (want 0 would let it go).
        self._apply(key, self._ask(key, max(held, 1), in_use=in_use, backoff_until=until), in_use)

    def _apply(self, key: str, grant: DomainGrant, in_use: int = 0) -> None:
        """Make Scrapy's download slot for ``key`` keep to the grant (asked for
        with ``in_use`` requests in flight)."""
        self.slots[key] = grant.slots
        if 0 < grant.slots < in_use:
            self.over.add(key)
        else:
            self.over.discard(key)
        if grant.delay > self.delay_of(key):  # another chunk read the site's robots.txt
            self.crawl_delay[key] = grant.delay
        downloader = self.crawler.engine.downloader
        delay = self.delay_of(key)
        settings: dict[str, Any] = {"concurrency": grant.slots, "delay": delay}
        if self.crawl_delay.get(key, 0.0) > self.delay:
            # A Crawl-delay is the least the site asked for: no ±50% jitter
            # (RANDOMIZE_DOWNLOAD_DELAY) below it.
            settings["jitter"] = 0.0
        downloader.per_slot_settings.setdefault(key, {}).update(settings)
        slot = downloader.slots.get(key)
        if slot is not None:
            slot.concurrency = grant.slots
            slot.delay = delay
            if "jitter" in settings:
                slot.jitter = 0.0
        if grant.start_after > time.time() and delay > 0:
            # The previous holder's last request plus the delay: Scrapy's slot
            # spaces requests from ``lastseen`` (monotonic).
            if slot is None:
                _, slot = downloader._get_slot(Request(f"http://{key}/"))
            slot.lastseen = time.monotonic() + (grant.start_after - time.time()) - delay

    def slow_down(self, key: str, crawl_delay: float) -> None:
        """robots.txt asks for ``crawl_delay`` between requests to ``key``: from
        now on the domain is leased whole, with that delay."""
        if crawl_delay <= self.crawl_delay.get(key, 0.0):
            return
        self.crawl_delay[key] = crawl_delay
        if self.slots.get(key, 0) > 0:
            self._apply(key, self._ask(key, self.capacity))

    def renew(self) -> None:
        """Every :data:`RENEW_EVERY` seconds, ask again for each domain held without
        a delay (trimmed to a fair share when a newcomer waits), and for each
        domain whose lease was lost while requests wait in its download slot."""
        now = time.monotonic()
        if now - self.renewed < RENEW_EVERY:
            return
        self.renewed = now
        downloader = self.crawler.engine.downloader
        for key, held in list(self.slots.items()):
            slot = downloader.slots.get(key)
            if held <= 0:
                # Lost its lease (robots.txt made the domain exclusive): requests
                # wait in the download slot until the lease comes back.
                if slot is not None and slot.queue:
                    grant = self._ask(key, self.capacity)
                    if grant.slots > 0:
                        self._apply(key, grant)
                        downloader._process_queue(slot)
                continue
            if self.delay_of(key) > 0:
                continue  # an exclusive lease is kept to the end
            # Counted as the engine counts them (its download slot learns of a
            # request later): never less than the site may see.
            in_use = self._busy(key)
            grant = self._ask(key, self.capacity, in_use=in_use)
            self._apply(key, grant, in_use)

    def release(self) -> None:
        """Let every lease go (the chunk is closing)."""
        for key, held in list(self.slots.items()):
            if held > 0:
                self._ask(key, 0)
            self.slots[key] = 0


class SharedRobotsTxt(RobotsTxtMiddleware):
    """Scrapy's robots.txt middleware, fetching each site's file once per run:
    what the first chunk fetched is kept in the store for the others."""

    def __init__(self, crawler: Any) -> None:
        chunk = CHUNK
        if not chunk or chunk.get("store") is None:
            raise NotConfigured
        super().__init__(crawler)
        self.store = chunk["store"]
        self.run_id: str = chunk["run_id"]
        self.gate: DomainGate | None = chunk.get("gate")
        self.chunk = chunk
        # Per netloc: the download timeout of this chunk's robots.txt fetch,
        # when it must end before the chunk's cut-off.
        self.bounds: dict[str, float] = {}

    async def process_request(self, request: Request, spider: Any = None) -> None:
        """Scrapy's check; and this chunk's own robots.txt fetch, when bounded,
        gets its timeout here (Scrapy builds that request inside ``robot_parser``)."""
        if request.callback is NO_CALLBACK and request.meta.get("dont_obey_robotstxt"):
            bound = self.bounds.pop(urlparse_cached(request).netloc, None)
            if bound is not None and urlparse_cached(request).path == "/robots.txt":
                own = request.meta.get("download_timeout")
                if own is None:
                    own = getattr(self.crawler.spider, "download_timeout", None)
                if own is None:
                    own = self.crawler.settings.getfloat("DOWNLOAD_TIMEOUT")
                request.meta["download_timeout"] = min(float(own), bound)
                request.meta["dont_retry"] = True  # a retry would not fit either
                self._stats.inc_value("fanout/robots_bounded")
        await super().process_request(request)

    async def robot_parser(self, request: Request) -> Any:
        netloc = urlparse_cached(request).netloc
        if netloc not in self._parsers:
            kept = self._kept(netloc)
            # A page handed on while it waited (for this file, or its own
            # answer): a fetch of the file the chunk that had it made, or waited
            # for, was cut off with it. Waiting for another chunk's fetch again
            # could go on chunk after chunk: this chunk fetches it; and after
            # MAX_IN_FLIGHT_HAND_ONS such chunks, within its own time, so that
            # a robots.txt that never answers ends as unavailable (everything
            # allowed, as Scrapy does when it cannot fetch one), not as a crawl
            # that stalls until the run's max_depth.
            hand_ons = 0
            if kept is None:
                waited = self.chunk.get("waited", {}).get(netloc, 0)
                hand_ons = max(in_flight_hand_ons(request.meta), waited)
            if hand_ons >= MAX_IN_FLIGHT_HAND_ONS:
                cut_at = float(self.chunk.get("cut_at", 0.0)) or None
                if cut_at is not None:
                    left = cut_at - time.monotonic() - CUT_MARGIN
                    self.bounds[netloc] = max(0.05, left * ROBOTS_SHARE)
            if kept is None and not self._fetch_is_ours(netloc) and not hand_ons:
                # Another chunk is fetching it. This chunk's other requests to
                # the site wait on ``pending``, as on Scrapy's own fetch.
                pending: Deferred[Any] = Deferred()
                self._parsers[netloc] = pending
                parser = None
                try:
                    kept = await self._wait_for_kept(netloc)
                    del self._parsers[netloc]
                    if kept is not None:
                        parser = self._from_kept(request, netloc, kept)
                    else:  # not kept in time: fetched here after all
                        parser = await super().robot_parser(request)
                finally:
                    if self._parsers.get(netloc) is pending:  # the wait was cut short
                        self._parsers[netloc] = parser  # None: allowed, as Scrapy on an error
                    pending.callback(parser)
                return parser
            if kept is not None:
                return self._from_kept(request, netloc, kept)
        return await super().robot_parser(request)

    def _from_kept(self, request: Request, netloc: str, kept: bytes) -> Any:
        """The parser of a robots.txt another chunk kept in the store."""
        self._stats.inc_value("fanout/robots_from_store")
        parser = build_from_crawler(self._parserimpl, self.crawler, kept)
        self._parsers[netloc] = parser
        self._note_delay(request, parser)
        return parser

    def _fetch_is_ours(self, netloc: str) -> bool:
        """Claim the run's one fetch of ``netloc``'s robots.txt in the seen-set,
        through the chunk's claim book; False: another chunk's live claim holds it."""
        return book_of(self.crawler).claim_fingerprint(robots_fingerprint(netloc))

    async def _wait_for_kept(self, netloc: str) -> bytes | None:
        """The robots.txt another chunk is fetching, once it is in the store;
        None if it is not there within :data:`ROBOTS_WAIT`."""
        # Imported here: importing the reactor installs one, and the chunk's
        # process must have installed Scrapy's (asyncio) reactor first.
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        give_up = time.monotonic() + ROBOTS_WAIT
        while time.monotonic() < give_up:
            await maybe_deferred_to_future(deferLater(reactor, ROBOTS_POLL, lambda: None))
            kept = self._kept(netloc)
            if kept is not None:
                return kept
        self._stats.inc_value("fanout/robots_wait_gave_up")
        return None

    async def _parse_robots(self, response: Any, netloc: str, request: Request) -> None:
        # Kept whatever its status: Scrapy parses the body of any answer (a 404
        # page's), and every chunk must apply what the one that fetched it did.
        body = response.body
        data = json.dumps({"status": response.status, "body": body.decode("utf-8", "replace")})
        self.store.put(robots_key(self.run_id, netloc), data.encode(), if_absent=True)
        # The delay first: the requests waiting for this file go out right after.
        self._note_delay(request, build_from_crawler(self._parserimpl, self.crawler, response.body))
        await super()._parse_robots(response, netloc, request)

    def _robots_error(self, exc: Exception, netloc: str) -> None:
        # Scrapy obeys nothing for the rest of its process when robots.txt
        # cannot be fetched; the run is one crawler, so the other chunks do the
        # same, and do not wait for a file that will not come. (IgnoreRequest:
        # the fetch was dropped, e.g. by this chunk closing, not answered.)
        cause = getattr(exc, "value", exc)  # a twisted Failure, in older Scrapy
        if not isinstance(cause, IgnoreRequest):
            data = json.dumps({"status": 0, "body": "", "error": type(cause).__name__})
            self.store.put(robots_key(self.run_id, netloc), data.encode(), if_absent=True)
        super()._robots_error(exc, netloc)

    def _kept(self, netloc: str) -> bytes | None:
        key = robots_key(self.run_id, netloc)
        if not self.store.exists(key):
            return None
        data = json.loads(self.store.get(key))
        # The body of whatever answered, as the fetching chunk parsed it (none
        # for a fetch that failed: then nothing is obeyed, as Scrapy does).
        return str(data.get("body", "")).encode()

    def _note_delay(self, request: Request, parser: Any) -> None:
        """Hand robots.txt's ``Crawl-delay`` for our user agent to the gate."""
        inner = getattr(parser, "rp", None)
        if self.gate is None or inner is None or not hasattr(inner, "crawl_delay"):
            return
        agent = self._robotstxt_useragent or self._default_useragent
        delay = inner.crawl_delay(agent)
        if delay:
            self.gate.slow_down(self.gate.key(request), float(delay))
