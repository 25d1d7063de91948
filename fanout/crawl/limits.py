"""Scrapy's ``CLOSESPIDER_*`` limits count the whole crawl, as in one Scrapy
process, not each chunk.

A spider with ``CLOSESPIDER_ITEMCOUNT = 100`` means "stop after 100 items".
Counted per chunk, as Scrapy's ``CloseSpider`` extension counts per process,
every chunk stopped after 100 and the crawl went on in the next: the whole
site was crawled. Instead, before each chunk the parent (``CrawlJob``) reads
what the run's committed chunks add up to (its records, its ``pages`` and
``callback_errors`` stats, the time since it started) and gives the chunk's
extension only what is left (:func:`remaining`); a chunk that reaches it
closes with Scrapy's own reason (``closespider_itemcount``...), which ends the
run as a ``CloseSpider`` the spider raised does (:data:`REASONS`). With nothing
left, the run stops before the chunk crawls anything.

Chunks that run at the same time each get what was left when they started, so
the run may pass a count by what they fetch together (Scrapy too passes it by
what is in flight when it closes). ``CLOSESPIDER_TIMEOUT_NO_ITEM`` and
``CLOSESPIDER_PAGECOUNT_NO_ITEM`` still count per chunk.
"""

from __future__ import annotations

import math
from typing import Any

#: The settings counted run-wide: each one's close reason, and the run figure
#: it is counted against (None: the seconds since the run started).
RUN_WIDE: dict[str, tuple[str, str | None]] = {
    "CLOSESPIDER_ITEMCOUNT": ("closespider_itemcount", "records"),
    "CLOSESPIDER_PAGECOUNT": ("closespider_pagecount", "pages"),
    "CLOSESPIDER_ERRORCOUNT": ("closespider_errorcount", "callback_errors"),
    "CLOSESPIDER_TIMEOUT": ("closespider_timeout", None),
}
#: Close reasons that end the crawl, and the run, not only the chunk.
REASONS = frozenset(reason for reason, _ in RUN_WIDE.values())


def spider_limits(spider_cls: type[Any]) -> dict[str, float]:
    """The run-wide limits the spider sets (its ``custom_settings``, as Scrapy
    reads them): setting name → limit, only those above 0 (0 is "no limit")."""
    from scrapy.settings import Settings

    settings = Settings()
    spider_cls.update_settings(settings)
    limits = {name: settings.getfloat(name) for name in RUN_WIDE}
    return {name: value for name, value in limits.items() if value > 0}


def remaining(
    limits: dict[str, float], records: int, stats: dict[str, int], started: float, now: float
) -> dict[str, float]:
    """What is left of each limit after the run's committed chunks: ``records``
    emitted, ``stats`` summed (``pages``, ``callback_errors``), ``started`` and
    ``now`` (wall clock) for the timeout. A count left is whole; 0 or less is spent."""
    left = {}
    for name, limit in limits.items():
        figure = RUN_WIDE[name][1]
        if figure is None:
            left[name] = limit - (now - started)
        else:
            done = records if figure == "records" else int(stats.get(figure, 0))
            left[name] = float(math.ceil(limit - done))
    return left


def spent(left: dict[str, float]) -> str | None:
    """The close reason of the first limit with nothing left, or None."""
    for name, value in left.items():
        if value <= 0:
            return RUN_WIDE[name][0]
    return None
