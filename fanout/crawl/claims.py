"""Run-wide de-duplication of a crawl chunk's requests: each page is claimed
once per run, and every copy Scrapy makes of a request carries its claim.

A request the chunk may fetch carries its claim in ``meta["fanout_claim"]``:
its own fingerprint, set when the chunk claimed it in the ledger or received
it in its frontier (its parent claimed it). Scrapy's retry and redirect
middlewares and fanout's throttle hand-off copy ``meta``, so:

- a copy whose claim is its own fingerprint (a retry, a request held back for
  a throttled domain, a request handed on from a parent) is the same request:
  it is scheduled without asking the ledger again, unless this chunk already
  has a response for that page;
- a redirect's target carries its *source's* claim, a different fingerprint:
  the target is a page of its own and is claimed like a new link (so a target
  that another chunk, or this chunk's frontier, holds is not fetched twice,
  even though Scrapy gives the target the source's ``dont_filter``); a
  redirect to its own URL is dropped, as Scrapy's dupe filter drops it, unless
  the source was ``dont_filter``;
- a request the spider yields with ``dont_filter=True`` is honoured, as Scrapy
  honours it: no claim, no check (and any claim copied into its meta from the
  response is dropped, so it cannot pass for a copy).

The new links of one response are claimed in one ledger call
(:class:`ClaimBatch`, a spider middleware), after a per-chunk cache of
fingerprints this chunk holds or knows another chunk holds, and the worker's
fingerprints of attempts known to have committed (:mod:`fanout.crawl.known`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from scrapy import Request, Spider
from w3lib.url import canonicalize_url

from fanout.backends.crawlstate import CrawlState
from fanout.crawl.channel import CHUNK

#: The meta key of a request's claim (its fingerprint, hex).
CLAIM = "fanout_claim"


class ClaimBook:
    """One chunk's view of the run's seen-set."""

    def __init__(
        self,
        crawl: CrawlState,
        run_id: str,
        owner: str,
        token: str,
        fingerprinter: Any,
        stats: Any,
        known: set[str] | None = None,
    ) -> None:
        self.crawl = crawl
        self.run_id = run_id
        self.owner = owner
        self.token = token
        self.fingerprinter = fingerprinter
        self.stats = stats
        self.held: set[str] = set()  # claims this chunk holds (its own, or its frontier's)
        self.elsewhere: set[str] = set()  # known to be held by another chunk
        self.answered: set[str] = set()  # pages this chunk has a response for
        self.won: set[str] = set()  # claimed in the ledger by this attempt
        # Held by attempts known to have committed (fanout.crawl.known): the
        # worker's, shared with it, never changed here.
        self.known: set[str] = known if known is not None else set()

    def fingerprint(self, request: Request) -> str:
        """Scrapy's request fingerprint, hex."""
        fp: bytes = self.fingerprinter.fingerprint(request)
        return fp.hex()

    def claim_fingerprint(self, fp: str) -> bool:
        """Claim ``fp``, a fingerprint of the chunk's own making (not a
        request's: robots.txt's fetch, ``fanout.crawl.politeness``), in one
        ledger call; False: another chunk's live claim holds it."""
        self.stats.inc_value("fanout/ledger_claim_calls")
        self.stats.inc_value("fanout/ledger_claimed_asked")
        return fp in self.crawl.claim_urls(self.run_id, self.owner, self.token, [fp])

    def adopt(self, request: Request) -> Request:
        """A request handed to this chunk with its claim (the frontier)."""
        fp = self.fingerprint(request)
        request.meta[CLAIM] = fp
        self.held.add(fp)
        return request

    def claim(self, requests: Iterable[Request]) -> list[Request]:
        """The requests of ``requests`` this chunk may fetch, claimed in one
        ledger call; a request it holds a claim for already is a duplicate."""
        fresh: dict[str, Request] = {}
        # Counted here and added once: most links of a page are duplicates, and
        # each call of Scrapy's stats collector costs a few microseconds.
        in_chunk = known = 0
        for request in requests:
            fp = self.fingerprint(request)
            if fp in self.held or fp in self.elsewhere or fp in fresh:
                in_chunk += 1
            elif fp in self.known:
                known += 1
            else:
                fresh[fp] = request
        if in_chunk:
            self.stats.inc_value("fanout/dupes_chunk", in_chunk)
        if known:
            self.stats.inc_value("fanout/dupes_known", known)
        if not fresh:
            return []
        self.stats.inc_value("fanout/ledger_claim_calls")
        self.stats.inc_value("fanout/ledger_claimed_asked", len(fresh))
        won = self.crawl.claim_urls(self.run_id, self.owner, self.token, list(fresh))
        out: list[Request] = []
        for fp, request in fresh.items():
            if fp in won:
                request.meta[CLAIM] = fp
                self.held.add(fp)
                self.won.add(fp)
                out.append(request)
            else:
                self.elsewhere.add(fp)
        if len(out) < len(fresh):
            self.stats.inc_value("fanout/dupes_run", len(fresh) - len(out))
        self.stats.inc_value("fanout/new_urls", len(out))
        return out

    def admit(self, request: Request) -> bool:
        """Whether the scheduler takes ``request`` (see the module's rules)."""
        claim = request.meta.get(CLAIM)
        if claim is None and request.dont_filter:
            return True  # the spider's own dont_filter
        fp = self.fingerprint(request)
        if claim == fp:
            if fp in self.answered or _redirected_to_itself(request):
                self.stats.inc_value("fanout/dupes_copy")
                return False
            self.held.add(fp)
            return True
        # No claim of its own: a redirect's target, or a request the spider
        # handed to the engine directly.
        return bool(self.claim([request]))

    def answer(self, request: Request) -> None:
        """The page of ``request`` got its response in this chunk."""
        self.answered.add(self.fingerprint(request))


def _redirected_to_itself(request: Request) -> bool:
    """Whether ``request`` is a redirect to the URL it came from that Scrapy's
    dupe filter would drop. It carries its source's claim, which is then its own
    fingerprint, and would pass for a retry of the page (fetched again until
    ``REDIRECT_MAX_TIMES``); Scrapy follows it only when the source was
    ``dont_filter`` (as its retries are), which the redirect keeps."""
    if request.dont_filter:
        return False
    hops = request.meta.get("redirect_urls")
    if not hops:
        return False
    return bool(canonicalize_url(hops[-1]) == canonicalize_url(request.url))


class ClaimBatch:
    """Spider middleware, nearest the engine (after Scrapy's depth, offsite and
    URL-length filters): a response's new links are claimed together, in one
    ledger call, once its callback has yielded them all. Items pass at once."""

    def __init__(self, book: ClaimBook) -> None:
        self.book = book

    def _admit(self, requests: list[Request]) -> list[Request]:
        follow: list[Request] = []
        claim: list[Request] = []
        for request in requests:
            if request.dont_filter:
                request.meta.pop(CLAIM, None)  # not a copy: the spider's own request
                follow.append(request)
            else:
                claim.append(request)
        return follow + self.book.claim(claim)

    def process_spider_output(
        self, response: Any, result: Iterable[Any], spider: Spider | None = None
    ) -> Iterator[Any]:
        """Items now; requests once the callback is done, claimed as one batch.
        A callback that raises keeps what it yielded first, as Scrapy keeps it:
        those requests are claimed and followed, then the error goes on."""
        requests: list[Request] = []
        try:
            for thing in result:
                if isinstance(thing, Request):
                    requests.append(thing)
                else:
                    yield thing
        except Exception:
            # Without this the batch so far would die with the generator: its
            # pages never fetched, silently (the error is only logged).
            yield from self._admit(requests)
            raise
        yield from self._admit(requests)

    async def process_spider_output_async(
        self, response: Any, result: AsyncIterator[Any], spider: Spider | None = None
    ) -> AsyncIterator[Any]:
        """The same, for asynchronous callbacks."""
        requests: list[Request] = []
        try:
            async for thing in result:
                if isinstance(thing, Request):
                    requests.append(thing)
                else:
                    yield thing
        except Exception:
            for request in self._admit(requests):  # as above: not lost with the error
                yield request
            raise
        for request in self._admit(requests):
            yield request


def book_of(crawler: Any) -> ClaimBook:
    """The chunk's claim book (one per chunk process)."""
    book = CHUNK.get("book")
    if book is None:
        book = ClaimBook(
            CHUNK["crawl"],
            CHUNK["run_id"],
            CHUNK["chunk_id"],
            CHUNK.get("token", ""),
            crawler.request_fingerprinter,
            crawler.stats,
            CHUNK.get("known"),
        )
        CHUNK["book"] = book
    return book
