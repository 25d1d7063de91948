"""Requests Scrapy gave up on are kept, not lost.

Scrapy retries a request that failed to download (a refused or reset
connection, a timeout, a DNS error: ``RETRY_EXCEPTIONS``) or that was answered
with a retryable status (``RETRY_HTTP_CODES``: 500, 502, 503, ...) up to
``RETRY_TIMES``, then gives up: it logs an error and the page is gone. A crawl
run would then "succeed" without it (a run whose start URL was unreachable
succeeded with no records).

In a crawl chunk, :class:`GiveUpWatch` sees each such request once Scrapy's
retry (and fanout's throttle rescue) let it go, and sends it to the parent (a
``given_up`` event), counting the rounds it was given up in its meta
(``GIVEN_UP_META``). The parent (``CrawlJob``) hands it on to a chunk of its
own, after the run's retry back-off (at least the crawl's ``throttle_base``),
for another round of Scrapy's retries:
``max_attempts`` rounds in all, as a failed chunk gets ``max_attempts``
attempts (but at least one round of its own, so that a chunk holding other
requests never dies for it). Given up in its last round, its chunk is dead at
once (:class:`RequestGivenUp`): counted against the run's tolerated failures,
listed by ``fanout failed`` and fetched again by ``fanout replay`` once the
site is fixed, like any failed chunk.

The rounds are chunks, not retries of one chunk: a retried chunk could find
the site throttled and hand the request on to a new chunk, whose attempts
start again at 1, for ever. The count travels with the request instead.

Not kept: a request with an errback (the spider handles its own failures, as
in Scrapy), one the spider marked ``dont_retry``, an answer the spider asked to
see (``handle_httpstatus_list`` and the like), Scrapy's own requests (robots.txt),
and one already handed on at the chunk's cut-off.
"""

from __future__ import annotations

from typing import Any

from scrapy import Request, Spider
from scrapy.http.request import NO_CALLBACK
from scrapy.utils.misc import load_object

from fanout.crawl.backoff import AWAY_META, THROTTLE_ANSWER_META, THROTTLE_META
from fanout.crawl.channel import CHUNK, InChunk, send
from fanout.crawl.codec import CodecError, request_to_json
from fanout.errors import PermanentError

#: Meta key: how often Scrapy gave this request up (its rounds so far).
GIVEN_UP_META = "fanout_given_up"


class RequestGivenUp(PermanentError):
    """A request Scrapy gave up on in every round it had: its chunk is dead
    at once (each round already had the run's back-off before it)."""


def rounds_given_up(request: dict[str, Any]) -> int:
    """How often Scrapy gave up the request (``request_to_json`` form)."""
    return int((request.get("meta") or {}).get(GIVEN_UP_META, 0))


def retry_exceptions(settings: Any) -> tuple[type[BaseException], ...]:
    """The download failures Scrapy's retry retries (``RETRY_EXCEPTIONS``)."""
    names = settings.getlist("RETRY_EXCEPTIONS")
    return tuple(load_object(e) if isinstance(e, str) else e for e in names)


class SpiderWants:
    """Whether the spider asked to see an answer of some status (Scrapy's
    ``HttpErrorMiddleware`` rules, from the crawler's settings): then the
    answer is the spider's, not a failure to keep or hold back."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self.allow_all = crawler.settings.getbool("HTTPERROR_ALLOW_ALL")
        self.allowed = set(crawler.settings.getlist("HTTPERROR_ALLOWED_CODES"))

    def __call__(self, request: Request, status: int, spider: Spider | None) -> bool:
        meta = request.meta
        if meta.get("handle_httpstatus_all", False):
            return True
        if "handle_httpstatus_list" in meta:
            return status in meta["handle_httpstatus_list"]
        if self.allow_all:
            return True
        spider = spider or getattr(self.crawler, "spider", None)
        return status in self.allowed or status in getattr(spider, "handle_httpstatus_list", ())


class RetryRules(InChunk):
    """What the middlewares that keep (this module) or hold back
    (``fanout.crawl.throttle``) failed requests read of Scrapy's retry, once a
    chunk: whether it is on, the failures it retries, and which answers the
    spider asked to see."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        self.retry_enabled = crawler.settings.getbool("RETRY_ENABLED")
        self.page_errors = retry_exceptions(crawler.settings)
        self.spider_wants = SpiderWants(crawler)

    def may_keep(self, request: Request) -> bool:
        """Whether a failed download of ``request`` is fanout's to keep or hold
        back, as Scrapy's retry would have tried it again: retry is on, the
        spider did not mark it ``dont_retry`` nor give it an errback (it handles
        the request's failures itself, and expects them as soon as the retry is
        spent), it is a page of the spider's (not Scrapy's own robots.txt,
        fetched outside the scheduler), and it was not handed on already at the
        chunk's cut-off."""
        return (
            self.retry_enabled
            and request.errback is None
            and request.callback is not NO_CALLBACK
            and not request.meta.get("dont_retry", False)
            and request not in CHUNK.get("handed_on", ())
        )


class GiveUpWatch(RetryRules):
    """Downloader middleware nearest the engine: a request Scrapy's retry gave
    up on (see the module's docstring) is sent to the parent to be kept."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        self.codes = {int(code) for code in crawler.settings.getlist("RETRY_HTTP_CODES")}

    def process_response(
        self, request: Request, response: Any, spider: Spider | None = None
    ) -> Any:
        status = response.status
        if (
            status in self.codes
            and self.may_keep(request)
            and not self.spider_wants(request, status, spider)
        ):
            self._given_up(request, f"HTTP {status}")
        return response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> None:
        if isinstance(exception, self.page_errors) and self.may_keep(request):
            text = " ".join(str(exception).split())
            self._given_up(request, f"{type(exception).__name__}: {text}"[:300])

    def _given_up(self, request: Request, reason: str) -> None:
        self.crawler.stats.inc_value("fanout/given_up")
        again = request.replace()
        # How often Scrapy gave it up: the parent decides on another round.
        again.meta[GIVEN_UP_META] = int(request.meta.get(GIVEN_UP_META, 0)) + 1
        # A new round: Scrapy's retries afresh, and the throttle back-off too (the
        # rounds, not the throttle rescue, count its failures from now on).
        for key in ("retry_times", THROTTLE_META, THROTTLE_ANSWER_META, AWAY_META):
            again.meta.pop(key, None)
        try:
            data = request_to_json(again, CHUNK["spider"])
        except (CodecError, ValueError) as exc:
            # Checked when it was scheduled (check_keepable): not expected. Claimed,
            # so no other chunk fetches it: the chunk fails for good, saying why.
            send("fatal", f"request {request.url}, given up, cannot be kept: {exc}")
            return
        send("given_up", {"request": data, "reason": reason})
