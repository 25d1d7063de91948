"""A site that asks the crawl to slow down, or that cannot be reached, is backed
off run-wide: its requests wait for a later chunk instead of being sent (and
failing) now. The constants and the ``Retry-After`` reading are in
:mod:`fanout.crawl.backoff`; the hand-on delays in :class:`fanout.crawl.CrawlJob`.

Two downloader middlewares, one each side of Scrapy's retry:

* :class:`ThrottleWatch`, just above the retry, sees every answer and every
  failure first. A 429/503 answer, a connection the site's host refused or
  never let happen (:func:`unreachable`: nothing listens, no DNS name, the
  connect timed out), or :data:`DOWN_AFTER` pages in a row failing in a way
  that may be the site's or the page's (a gateway's 502/504, a reset, no
  answer, a timeout) marks the domain as throttled in this chunk, so that
  Scrapy's retry of the request, and every other request to the domain, is
  held back for a later chunk; and it backs the domain off run-wide for
  ``throttle_base`` (or the site's ``Retry-After``), so the other chunks wait
  too.
* :class:`ThrottleRescue`, nearest the engine: a request the retry gave up on
  for one of those reasons is scheduled again, held back with its domain,
  rather than dropped, up to ``MAX_THROTTLE_LEVEL`` hand-ons of its own; only
  then does Scrapy's give-up stand (and :mod:`fanout.crawl.givenup` keep it).

Why a host that cannot be reached is treated as one that asked to slow down:
a site restarting for a minute failed every request sent to it, each of which
Scrapy gave up after its quick retries; every page in flight, and every page
the frontier sent after it, became a chunk of its own (276 of 300 pages for a
60 s outage), each a process. Held back with their domain, the frontier waits
in the chunks it was in, and only the few requests in flight at each probe
climb a level. A site held as away (not one that asked to slow down) is tried
again after ever longer pauses, up to ``MAX_AWAY_FACTOR`` times
``throttle_base`` (:data:`~fanout.crawl.backoff.AWAY_META`, counted by
``CrawlJob``): every try is a chunk per ``pages_per_chunk`` of its requests.

A failure after the connection was made (a reset, a timeout of the answer, a
proxy's 502) may be the page's own: alone, it is left to the
retry and the given-up rounds, so a single broken page does not hold its site
back; several pages failing in a row, with no good answer between them, are
the site's (an application restarting behind its proxy answers 502 to all).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from scrapy import Request, Spider
from scrapy.utils.misc import load_object
from twisted.internet.error import ConnectError, DNSLookupError

from fanout.crawl.backoff import (
    AWAY_AT_META,
    AWAY_META,
    DEFAULT_THROTTLE_BASE,
    MAX_BACKOFF,
    MAX_THROTTLE_LEVEL,
    OWN_FAILURE_META,
    OWN_FAILURES,
    THROTTLE_ANSWER_META,
    THROTTLE_META,
    THROTTLE_STATUSES,
    away_pause,
    parse_retry_after,
)
from fanout.crawl.channel import CHUNK
from fanout.crawl.components import domain_of, gate_of
from fanout.crawl.givenup import GIVEN_UP_META, RetryRules
from fanout.crawl.politeness import DomainGate

__all__ = ["DOWN_AFTER", "GATEWAY_STATUSES", "ThrottleRescue", "ThrottleWatch", "unreachable"]

#: Answers by which a gateway says the site behind it is away (a proxy's 502
#: and 504, Cloudflare's 522 and 524): the site's, not the page's, once
#: :data:`DOWN_AFTER` pages answered so in a row.
GATEWAY_STATUSES = frozenset({502, 504, 522, 524})
#: Distinct pages of a domain whose fetch failed in a row, with no good answer
#: between them (a gateway status, a reset, no answer, a timeout), that make
#: the failures the site's: one broken page alone never holds its site back.
#: A site that is away fails every page in flight at once (16 at Scrapy's
#: defaults); a flaky one that fails a fifth of its pages has a run of 5 about
#: once in 4,000 pages (of 3, once in 160), each a ``throttle_base`` pause.
DOWN_AFTER = 5


def _host_errors() -> tuple[type[BaseException], ...]:
    """Twisted's connect errors (refused, connect timeout, no route), its DNS
    error, and the names newer Scrapy wraps two of them in (absent in older)."""
    found: list[type[BaseException]] = [ConnectError, DNSLookupError]
    for name in (
        "scrapy.exceptions.DownloadConnectionRefusedError",
        "scrapy.exceptions.CannotResolveHostError",
    ):
        with contextlib.suppress(ImportError, NameError, AttributeError):
            found.append(load_object(name))
    return tuple(found)


_HOST_ERRORS = _host_errors()


def unreachable(exception: BaseException) -> bool:
    """Whether ``exception`` says no connection to the host could be made: its
    cause is the host (down, restarting, not resolvable), not the page."""
    return isinstance(exception, _HOST_ERRORS)


def own_failure(request: Request, gate: DomainGate) -> bool:
    """Whether the request's page is known broken: it failed before while its
    site answered other pages (this chunk's good answer came after its failure,
    or an earlier chunk's did: the mark it was handed on with); or it was held
    back with its site as away, and the site has answered some chunk since."""
    if request.meta.get(OWN_FAILURE_META) or request.url in CHUNK.get(OWN_FAILURES, ()):
        return True
    held_at = request.meta.get(AWAY_AT_META)
    return held_at is not None and gate.answered_since(request, float(held_at))


class ThrottleWatch(RetryRules):
    """Downloader middleware, just above Scrapy's retry: a 429/503 answer, a
    host that cannot be reached, or :data:`DOWN_AFTER` pages failing in a row
    marks its domain as throttled, so that the retry Scrapy schedules (and
    every other request to that domain) is held back for a later chunk, not
    sent at once. A ``Retry-After`` longer than fanout's own back-off sets the
    domain's."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        #: Per domain: the pages that failed since its last good answer.
        self.failing: dict[str, set[str]] = {}
        #: The domains that gave this chunk a good answer.
        self.answered: set[str] = set()

    def process_response(
        self, request: Request, response: Any, spider: Spider | None = None
    ) -> Any:
        status = response.status
        if status in THROTTLE_STATUSES:
            wait = parse_retry_after(response.headers.get(b"Retry-After"))
            self._hold(request, wait)
            self.crawler.stats.inc_value("fanout/throttled")
        elif status in GATEWAY_STATUSES:
            if self.may_keep(request) and not self.spider_wants(request, status, spider):
                self._failed(request)
        else:
            domain = domain_of(request)  # the site answers
            gate_of(self.crawler).site_answered(request)
            failed = self.failing.pop(domain, None)
            if failed:
                # The site answers after they failed: their pages are broken.
                CHUNK.setdefault(OWN_FAILURES, set()).update(failed)
            self.answered.add(domain)
        return response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> None:
        if not self.may_keep(request):
            return
        if unreachable(exception):
            self._hold(request, 0.0, away=True)
            self.crawler.stats.inc_value("fanout/unreachable")
        elif isinstance(exception, self.page_errors):
            self._failed(request)

    def _failed(self, request: Request) -> None:
        """A fetch that may have failed for the page or for the site: the
        site's once :data:`DOWN_AFTER` pages failed in a row, while the domain
        is held back already, or when the request was held back with its site
        before and the site has not answered this chunk yet (a chunk of a few
        such requests, trying a site again after an outage, would not reach
        :data:`DOWN_AFTER`; once the site answers, a broken page among them is
        one page again)."""
        if own_failure(request, gate_of(self.crawler)):
            # A broken page failing again says nothing about its site. Counted,
            # the held-back broken pages of a site, sent together in the next
            # chunk, failed "in a row" and marked it away again, run-wide: its
            # good pages were held back generation after generation, and the
            # run stopped at max_depth. (Not every page that failed before: in
            # an outage, every page in flight fails, and its retries are the
            # evidence that the site is still away; nor a page held with its
            # site, until the site answers again: no chunk hears from it then.)
            request.meta[OWN_FAILURE_META] = True
            return
        domain = domain_of(request)
        pages = self.failing.setdefault(domain, set())
        pages.add(request.url)
        if (
            len(pages) >= DOWN_AFTER
            or domain in self.crawler.engine.scheduler.throttled
            or (THROTTLE_META in request.meta and domain not in self.answered)
        ):
            self._hold(request, 0.0, away=True)
            self.crawler.stats.inc_value("fanout/unreachable")

    def _hold(self, request: Request, wait: float, *, away: bool = False) -> None:
        scheduler = self.crawler.engine.scheduler
        domain = domain_of(request)
        scheduler.throttled.add(domain)
        if away:  # its requests wait longer each time (CrawlJob._hand_on)
            scheduler.away.add(domain)
        request.meta[THROTTLE_ANSWER_META] = True  # Scrapy's retry copies it
        self.crawler.stats.inc_value(f"fanout/domain/{domain}/throttled")
        if wait:
            scheduler.retry_after[domain] = max(wait, scheduler.retry_after.get(domain, 0.0))
        # Every other chunk crawling the site backs off too, for the first
        # back-off (or the site's Retry-After when longer): not for this
        # request's own, which grows with its level. One URL that always
        # answers 503 would otherwise hold its whole site back for longer
        # and longer; a site busy all over answers the next try 429 again.
        base = float(CHUNK.get("throttle_base", DEFAULT_THROTTLE_BASE))
        span = base
        if away:
            # A site that is away is backed off for as long as its held requests
            # pause (CrawlJob._hand_on): a request given up alone, trying its
            # round in its own chunk, is then held too, not failed, in between.
            span = away_pause(base, int(request.meta.get(AWAY_META, 0)) + 1)
        gate = gate_of(self.crawler)
        gate.back_off(gate.key(request), time.time() + max(wait, min(MAX_BACKOFF, span)))


class ThrottleRescue(RetryRules):
    """Downloader middleware, nearest the engine: a 429/503 answer that got
    through Scrapy's retry (``RETRY_TIMES`` spent, or retry off) would be dropped
    as an HTTP error, and a host that could not be reached given up (so would a
    page that failed while its site is held back as away); instead the request
    is scheduled again, is held back (its domain is throttled) and
    goes to a later chunk, after a back-off. Not when the spider asked to see
    such answers (``handle_httpstatus_list``), nor after ``MAX_THROTTLE_LEVEL``
    back-offs, nor for a request Scrapy gave up on before (its rounds count its
    failures: :mod:`fanout.crawl.givenup`). The copy carries the request's claim."""

    def process_response(
        self, request: Request, response: Any, spider: Spider | None = None
    ) -> Any:
        status = response.status
        if status not in THROTTLE_STATUSES and not (
            status in GATEWAY_STATUSES and self._held(request)
        ):
            return response
        if self.spider_wants(request, status, spider):
            return response
        return self._again(request) or response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> Request | None:
        if not self.may_keep(request):
            return None
        if unreachable(exception) or (
            isinstance(exception, self.page_errors) and self._held(request)
        ):
            return self._again(request)
        return None

    def _held(self, request: Request) -> bool:
        """Whether the request's domain is held back (the site's, not the page's)."""
        return domain_of(request) in self.crawler.engine.scheduler.throttled

    def _again(self, request: Request) -> Request | None:
        """The request scheduled again (to be held back), or None: let it go."""
        if int(request.meta.get(THROTTLE_META, 0)) >= MAX_THROTTLE_LEVEL:
            self.crawler.stats.inc_value("fanout/throttle_gave_up")
            return None
        if request.meta.get(GIVEN_UP_META):
            return None  # given up before: its rounds count its failures now
        self.crawler.stats.inc_value("fanout/throttle_kept")
        # The same request: dont_filter gets it past Scrapy's own checks, and
        # its claim (copied meta) keeps the ledger from being asked again.
        return request.replace(dont_filter=True)
