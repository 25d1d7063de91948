"""How a crawl backs off a site that asks it to (429 and 503 answers, their
``Retry-After``): the constants and the header's reading, without Scrapy.
The middlewares that apply them are in :mod:`fanout.crawl.components`; the
hand-on delays in :class:`fanout.crawl.CrawlJob`."""

from __future__ import annotations

import email.utils
import time

#: Meta key counting how often a request was held back after it was answered
#: 429/503 itself (it sets the back-off of the chunk that carries it on).
THROTTLE_META = "fanout_throttle"
#: Meta key set on a request answered 429/503 (and on Scrapy's retry of it) until
#: it is handed on: only such a request climbs a throttle level, not the others
#: held back with it because their domain was backed off.
THROTTLE_ANSWER_META = "fanout_throttle_answer"
#: Meta key counting how often a request was handed on because its site was
#: away (``fanout.crawl.throttle``): the pause before it is tried again doubles
#: with it, from ``throttle_base`` to :data:`MAX_AWAY_FACTOR` times that.
AWAY_META = "fanout_away"
#: Meta key set on a request whose fetch failed while its site answered other
#: pages (a good answer came after the failure): a broken page, whose failures
#: are its own, never taken as its site's (``fanout.crawl.throttle``).
OWN_FAILURE_META = "fanout_own_failure"
#: Meta key: when (wall clock) a request was last handed on held because its
#: site was away. Failing after the site answered some chunk since, it is a
#: broken page, not a sign the site is still away (``fanout.crawl.throttle``).
AWAY_AT_META = "fanout_away_at"
#: The chunk's key (``fanout.crawl.channel.CHUNK``) of the URLs found broken so,
#: marked when they are handed on.
OWN_FAILURES = "own_failures"
#: The longest pause before a site that stays away is tried again, in
#: ``throttle_base``s (20 s at the default): also about the longest a crawl
#: waits, once the site is back, before it notices. Fewer probes of a long
#: outage (each a chunk per pages_per_chunk of its requests) against a later
#: start after it: a 30 s outage at a 1 s base made 329 chunks without the
#: doubling, 85 with it up to 16 s (done 13 s after the site was back).
MAX_AWAY_FACTOR = 4.0


def away_pause(base: float, tries: int) -> float:
    """The pause (s) before a site held as away for the ``tries``-th time (1
    and up) is tried again: ``base``, doubling, at most :data:`MAX_AWAY_FACTOR`
    times it. The held requests wait this long, and the run backs the site off
    for as long (``fanout.crawl.throttle``)."""
    return base * min(MAX_AWAY_FACTOR, 2.0 ** (max(1, tries) - 1))


#: The statuses by which a site asks a crawler to slow down.
THROTTLE_STATUSES = (429, 503)
#: A request is handed on with back-off at most this many times for 429/503
#: answers of its own; after that its last answer goes to the spider as Scrapy
#: would (an HttpError to its errback). At 8, with the site's back-off growing
#: with it, one URL that always answered 503 kept its run going for 20
#: minutes; at 5 (the site held back one ``throttle_base`` at a time) it is
#: given up after about a minute at the default base, patience enough for a
#: site's per-minute quota that sends no Retry-After.
MAX_THROTTLE_LEVEL = 5
#: The first back-off (s) of a throttled domain's requests (``CrawlJob``'s
#: ``throttle_base``), and the longest fanout's own back-off grows to.
DEFAULT_THROTTLE_BASE = 5.0
MAX_BACKOFF = 900.0
#: The longest ``Retry-After`` fanout waits out (seconds).
MAX_RETRY_AFTER = 6 * 3600.0


def parse_retry_after(value: bytes | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks for (0 when absent or unreadable)."""
    if not value:
        return 0.0
    text = value.decode("latin-1").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return 0.0
        seconds = when.timestamp() - (now if now is not None else time.time())
    if seconds != seconds:  # NaN
        return 0.0
    return max(0.0, min(seconds, MAX_RETRY_AFTER))
