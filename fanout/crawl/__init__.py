"""Crawl jobs: an unmodified Scrapy spider, run as checkpointed, fanned-out chunks.

    import scrapy
    from fanout.crawl import CrawlJob

    class Books(scrapy.Spider):
        name = "books"
        ...

    job = CrawlJob(Books, schema="book")

The root chunk runs the spider's own start requests. Each chunk runs the real
Scrapy engine (downloader, middlewares, pipelines, settings) until it has
fetched ``pages_per_chunk`` responses (the root chunk, which runs alone, a
quarter of that) or its time runs low, lets in-flight requests finish, and
hands every request it still holds to child chunks.
Requests are de-duplicated run-wide by Scrapy's fingerprint in the ledger, so a
page is fetched once across all chunks. Run params reach the spider as spider
arguments, as ``scrapy crawl -a key=value`` passes them.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fanout.context import ChunkContext
from fanout.crawl.backoff import (
    AWAY_AT_META,
    AWAY_META,
    DEFAULT_THROTTLE_BASE,
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    THROTTLE_ANSWER_META,
    THROTTLE_META,
    away_pause,
)
from fanout.crawl.chunk import prewarm, run_chunk
from fanout.crawl.givenup import RequestGivenUp, rounds_given_up
from fanout.crawl.known import KNOWN, MAX_LINEAGE, parse_lineage
from fanout.crawl.limits import remaining, spent, spider_limits
from fanout.errors import ParamsError, PermanentError
from fanout.jobs import Job
from fanout.limits import RunKind
from fanout.retry import compute_backoff

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["ROOT_SHARE", "THROTTLE_META", "CrawlJob"]

#: The root chunk fetches ``pages_per_chunk // ROOT_SHARE`` pages: it runs
#: alone, so the sooner it hands on, the sooner other workers crawl too.
ROOT_SHARE = 4


def spider_refuses(spider_cls: type[Any], kwargs: dict[str, Any]) -> str | None:
    """Why ``spider_cls(**kwargs)`` would fail for its arguments alone, or None
    (a spider that builds itself its own way, in a ``from_crawler`` of its own,
    is not judged: Scrapy's own spiders' call ``cls(*args, **kwargs)``)."""
    own = [c for c in spider_cls.__mro__ if not c.__module__.startswith(("scrapy.", "builtins"))]
    if any("from_crawler" in vars(c) for c in own):
        return None
    try:
        signature = inspect.signature(spider_cls.__init__)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None, **kwargs)
    except TypeError as exc:
        takes = [n for n in list(signature.parameters)[1:] if n not in ("args", "kwargs")]
        return (
            f"spider {spider_cls.__name__}: {exc}"
            f" (its __init__ takes: {', '.join(takes) or 'nothing'})"
        )
    return None


class CrawlJob(Job):
    """A job that runs the Scrapy spider ``spider_cls`` in chunks.

    ``pages_per_chunk`` bounds the responses one chunk fetches before it hands
    its frontier on (a run setting: ``-S pages_per_chunk=N`` overrides it);
    ``throttle_base`` is the first back-off (s) of requests to
    a domain that answered 429 or 503. Other keywords are :class:`Job`'s.
    """

    kind = RunKind.CRAWL

    def __init__(
        self,
        spider_cls: type[Any],
        schema: Any = None,
        *,
        name: str | None = None,
        pages_per_chunk: int = 250,
        throttle_base: float = DEFAULT_THROTTLE_BASE,
        **settings: Any,
    ) -> None:
        settings.setdefault("max_depth", 63)  # chunk generations, not page depth
        super().__init__(
            name or spider_cls.name,
            params=None,
            schema=schema,
            pages_per_chunk=pages_per_chunk,  # a run setting: -S pages_per_chunk=N
            **settings,
        )
        self.spider_cls = spider_cls
        self.throttle_base = throttle_base
        #: The spider's CLOSESPIDER_* limits counted run-wide (fanout.crawl.limits).
        self.limits = spider_limits(spider_cls)
        self.process(self._process)
        # Now, in the process that loads the job: `fanout run` loads it before
        # forking its workers, which then start warm (each worker would
        # otherwise spend ~0.3 s on it in its first chunk).
        prewarm()

    def validate_params(self, raw: Mapping[str, Any]) -> BaseModel | dict[str, Any]:
        """As :meth:`Job.validate_params`, and the params must be arguments the
        spider takes (they are its ``-a`` arguments): a misspelled one is
        refused at submit, not met by every chunk."""
        params = super().validate_params(raw)
        problem = spider_refuses(self.spider_cls, dict(params))
        if problem is not None:
            raise ParamsError(f"params for job {self.name}: {problem}")
        return params

    def _process(self, payload: Any, ctx: ChunkContext) -> None:
        crawl = ctx._crawl
        if crawl is None or not crawl.shared_across_processes:
            # Each crawl chunk is a forked process: an in-process crawl state
            # would give every chunk its own copy of the seen-set.
            raise PermanentError("crawl jobs need a backend shared across processes (local, aws)")
        frontier = None if ctx.chunk_id == "0" else payload["requests"]
        # The attempts that committed this chunk's ancestors: their claims are
        # this worker's to trust (fanout.crawl.known).
        lineage = {} if frontier is None else parse_lineage(payload.get("lineage"))
        KNOWN.learn(ctx.run_id, lineage)
        closespider = self._closespider(ctx)
        if closespider is not None and (reason := spent(closespider)) is not None:
            # Nothing left of a CLOSESPIDER_* limit: the crawl is over, its
            # frontier dropped as Scrapy drops its queue when the spider closes.
            ctx.stop_run(f"the spider closed ({reason})")
            return
        log_level = logging.getLevelName(logging.getLogger("fanout").getEffectiveLevel())
        result = run_chunk(
            self.spider_cls,
            dict(ctx.params or {}),
            frontier,
            crawl=crawl,
            run_id=ctx.run_id,
            chunk_id=ctx.chunk_id,
            pages_per_chunk=self._chunk_pages(ctx),
            time_left=ctx.time_left(),
            log_level=os.environ.get("FANOUT_SCRAPY_LOG_LEVEL", log_level),
            token=ctx._token,
            store=ctx._store,
            throttle_base=self.throttle_base,
            known=KNOWN.known(ctx.run_id),
            closespider=closespider,
        )
        if result.fatal:
            # Retrying would meet the same request: the spider must change.
            raise PermanentError(f"crawl chunk gave up: {result.fatal[0]}")
        settings = ctx.settings or self.settings
        for entry in result.given_up:
            rounds = rounds_given_up(entry["request"])
            if rounds >= max(2, settings.max_attempts):
                # Its last round, in a chunk of its own (it is alone there): dead,
                # for `fanout replay` once the site is fixed (fanout.crawl.givenup).
                raise RequestGivenUp(
                    f"given up again after {rounds} rounds of Scrapy's retries:"
                    f" {entry['request'].get('method', 'GET')} {entry['request'].get('url')}:"
                    f" {entry.get('reason', '?')}"
                )
        KNOWN.remember(ctx.run_id, ctx.chunk_id, ctx._token, result.claims)
        for error in result.errors:
            ctx.log.error("crawl chunk: %s", error)
        for item in result.items:
            ctx.emit(item)
        ctx.stats.update(result.stats)
        if result.closed is not None:
            # CloseSpider: Scrapy's crawl ends there, and so does the run.
            ctx.stop_run(f"the spider closed ({result.closed})")
            return
        ctx.stats["handed_on"] += len(result.pending)  # requests passed to child chunks
        self._hand_on(result.pending, ctx, lineage)
        self._keep_given_up(result.given_up, ctx, lineage)

    def _closespider(self, ctx: ChunkContext) -> dict[str, float] | None:
        """What is left of the spider's CLOSESPIDER_* limits after the run's
        committed chunks (``fanout.crawl.limits``); None when it sets none."""
        if not self.limits:
            return None
        run = ctx._run_so_far()
        if run is None:
            return None
        return remaining(self.limits, run.records, run.stats, run.created_at, time.time())

    def _keep_given_up(
        self, given_up: list[dict[str, Any]], ctx: ChunkContext, lineage: dict[str, str]
    ) -> None:
        """Each request Scrapy gave up on gets a chunk of its own, after the
        run's retry back-off for the rounds it has had (``throttle_base`` at
        least): fetched again there, or given up in its last round and dead
        (:mod:`fanout.crawl.givenup`). In a stable order, as ``_hand_on``."""
        settings = ctx.settings or self.settings
        for entry in sorted(given_up, key=lambda e: json.dumps(e["request"], sort_keys=True)):
            request = entry["request"]
            ctx.log.warning(
                "crawl chunk: %s %s given up (%s): it gets a chunk of its own",
                request.get("method", "GET"),
                request.get("url"),
                entry.get("reason", "?"),
            )
            # At least the crawl's own first pause for a site (throttle_base, 5 s
            # by default): the run's retry back-off (1 s, jittered from 0) had
            # every page of a site that restarts in a few seconds dead.
            pause = max(
                self.throttle_base,
                compute_backoff(
                    rounds_given_up(request), base=settings.backoff_base, cap=settings.backoff_cap
                ),
            )
            self._spawn_parts([request], ctx, lineage, 1, pause)

    def _chunk_pages(self, ctx: ChunkContext) -> int:
        """The pages this chunk fetches at most: ``pages_per_chunk``, or a
        :data:`ROOT_SHARE` of it for the root chunk. The root runs alone: every
        other worker waits for its children, so it hands its frontier on early."""
        pages = self._pages_per_chunk(ctx)
        return max(1, pages // ROOT_SHARE) if ctx.chunk_id == "0" else pages

    def _pages_per_chunk(self, ctx: ChunkContext) -> int:
        settings = ctx.settings or self.settings
        return settings.pages_per_chunk

    def _hand_on(
        self,
        pending: list[dict[str, Any]],
        ctx: ChunkContext,
        lineage: dict[str, str] | None = None,
    ) -> None:
        """Pending requests become child chunks of at most ``pages_per_chunk``
        each, of even sizes, in a stable order (a re-run of this chunk makes the
        same children)."""
        normal: list[dict[str, Any]] = []
        throttled: dict[tuple[int, float], list[dict[str, Any]]] = {}
        away_from: dict[float, list[dict[str, Any]]] = {}  # sites away, by Retry-After
        for entry in sorted(pending, key=lambda e: json.dumps(e["request"], sort_keys=True)):
            request = entry["request"]
            if entry["throttled"]:
                meta = request.setdefault("meta", {})
                level = int(meta.get(THROTTLE_META, 0))
                if meta.pop(THROTTLE_ANSWER_META, False):
                    # Answered 429/503 itself: one level up. The others held back
                    # with it keep theirs, or one busy moment would grow every
                    # held request's back-off at each hand-on, for ever.
                    level += 1
                # Level 0 included: the next chunk knows the request was held
                # back with its site (fanout.crawl.throttle: a failure of it is
                # taken as the site's).
                meta[THROTTLE_META] = level
                # The site's own Retry-After, when it asks for longer.
                asked = min(float(entry.get("retry_after", 0.0)), MAX_RETRY_AFTER)
                # Held because its site is away (refused, failing all over):
                # counted, so a long outage is probed ever less often (each
                # probe is a chunk per pages_per_chunk of its requests).
                away = int(meta.get(AWAY_META, 0)) + bool(entry.get("away"))
                if away:
                    meta[AWAY_META] = away
                    away_from.setdefault(asked, []).append(request)
                else:
                    throttled.setdefault((level, asked), []).append(request)
            else:
                normal.append(request)
        size = self._pages_per_chunk(ctx)
        self._spawn_parts(normal, ctx, lineage, size)
        for asked, requests in sorted(away_from.items()):
            # Together, whatever their levels (which only say when each is given
            # up): a site that is away is away for all of them. The pause
            # doubles with the times they were held, from throttle_base to
            # MAX_AWAY_FACTOR times it.
            away = max(int(r["meta"][AWAY_META]) for r in requests)
            held_at = time.time()
            for request in requests:
                request["meta"][AWAY_META] = away
                request["meta"][AWAY_AT_META] = held_at
            pause = max(asked, away_pause(self.throttle_base, away))
            # Said, or a start URL nothing answers would wait minutes in silence.
            hosts = sorted({urlsplit(r.get("url", "")).netloc for r in requests})
            ctx.log.warning(
                "crawl chunk: %s away (refused, or failing all over): %d request%s held"
                " back, tried again in %.0f s",
                ", ".join(hosts[:3]) + (" ..." if len(hosts) > 3 else ""),
                len(requests),
                "" if len(requests) == 1 else "s",
                pause,
            )
            self._spawn_parts(requests, ctx, lineage, size, pause)
        for (level, asked), requests in sorted(throttled.items()):
            # At least the base: a throttled site is always given a pause.
            delay = min(
                MAX_BACKOFF,
                self.throttle_base
                + compute_backoff(level, base=self.throttle_base, cap=MAX_BACKOFF),
            )
            self._spawn_parts(requests, ctx, lineage, size, max(delay, asked))

    @staticmethod
    def _spawn_parts(
        requests: list[dict[str, Any]],
        ctx: ChunkContext,
        lineage: dict[str, str] | None,
        size: int,
        delay: float = 0.0,
    ) -> None:
        """Child chunks of ``requests``, at most ``size`` each (``_even_parts``).
        Each child's payload carries its lineage: ``lineage`` (this chunk's own)
        and this attempt, which is the one that committed if the child exists.
        A request Scrapy gave up on before goes alone: its chunk may end dead
        (``fanout.crawl.givenup``), and must not take others with it."""
        ancestors = list((lineage or {}).items())[-(MAX_LINEAGE - 1) :]
        lines = {**dict(ancestors), ctx.chunk_id: ctx._token}
        rest: list[dict[str, Any]] = []
        alone: list[list[dict[str, Any]]] = []
        for request in requests:
            if rounds_given_up(request):
                alone.append([request])
            else:
                rest.append(request)
        for part in _even_parts(rest, size) + alone:
            ctx.spawn({"requests": part, "lineage": lines}, delay=delay)


def _even_parts(items: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """``items`` in as few parts of at most ``size`` as can hold them, of even
    sizes: 300 requests at 250 a chunk make two chunks of 150, not 250 and 50,
    which other workers would finish long before the big one."""
    if not items:
        return []
    count = -(-len(items) // size)
    per = -(-len(items) // count)
    return [items[start : start + per] for start in range(0, len(items), per)]
