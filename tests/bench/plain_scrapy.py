"""The plain-Scrapy baseline: run a spider with ``CrawlerProcess`` in a fresh subprocess.

    from plain_scrapy import crawl_plain       # tests/bench on sys.path
    pages, items, seconds = crawl_plain(BooksSpider, server.url, concurrency=16)

Each call starts a new Python process (a fresh Twisted reactor), runs the spider
to completion with ``LOG_LEVEL=WARNING`` and reports the pages fetched (the
crawler's ``response_received_count`` stat), the items scraped and the crawl's
seconds (``CrawlerProcess.start()`` to its return, i.e. without interpreter
start-up and imports). It is the figure the crawl benchmark compares fanout
against.

From the command line, the baseline for the book site (served in this process)::

    python tests/bench/plain_scrapy.py --pages 5000 --concurrency 16 --repeat 3
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class PlainResult(NamedTuple):
    """What a plain-Scrapy crawl did."""

    pages: int  # responses received (response_received_count)
    items: list[dict[str, Any]]  # the scraped items, as dicts, in scrape order
    seconds: float  # CrawlerProcess.start() wall time

    @property
    def rate(self) -> float:
        """Pages per second."""
        return self.pages / self.seconds if self.seconds else 0.0


def spider_ref(spider_cls: type[Any]) -> str:
    """``module:QualName`` for an importable class, ``/path/file.py:QualName`` otherwise."""
    module = spider_cls.__module__
    if module != "__main__":
        return f"{module}:{spider_cls.__qualname__}"
    return f"{inspect.getfile(spider_cls)}:{spider_cls.__qualname__}"


def load_spider(ref: str) -> type[Any]:
    """The class a ``spider_ref`` names."""
    module_name, _, qualname = ref.rpartition(":")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_plain_scrapy_spider", module_name)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {module_name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target  # type: ignore[no-any-return]


def crawl_plain(
    spider_cls: type[Any],
    start_url: str,
    concurrency: int,
    settings: dict[str, Any] | None = None,
    *,
    spider_kwargs: dict[str, Any] | None = None,
    timeout: float = 900.0,
    stats: dict[str, Any] | None = None,
) -> PlainResult:
    """Crawl with plain Scrapy in a fresh subprocess; (pages, items, seconds).

    The spider is built with ``start_url=start_url`` (and ``spider_kwargs``).
    ``CONCURRENT_REQUESTS`` and ``CONCURRENT_REQUESTS_PER_DOMAIN`` are both set
    to ``concurrency`` (the test sites are one host; Scrapy's per-domain default
    of 8 would otherwise cap it). ``settings`` are applied at ``cmdline``
    priority, so they override the spider's ``custom_settings``. The crawler's
    final stats are copied into ``stats`` if given. The spider class must be
    importable in the child: it gets this process's ``sys.path``.
    """
    with tempfile.TemporaryDirectory(prefix="plain-scrapy-") as tmp:
        out = Path(tmp) / "result.json"
        config = {
            "spider": spider_ref(spider_cls),
            "sys_path": [p or os.getcwd() for p in sys.path],
            "spider_kwargs": {"start_url": start_url, **(spider_kwargs or {})},
            "concurrency": concurrency,
            "settings": settings or {},
            "out": str(out),
        }
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(Path(tmp) / "config.json"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"plain Scrapy crawl failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        result = json.loads(out.read_text())
    if stats is not None:
        stats.update(result["stats"])
        stats["_stderr"] = proc.stderr
    return PlainResult(result["pages"], result["items"], result["seconds"])


def _child(config_path: str) -> None:
    """In the subprocess: run the crawl, write pages, items, seconds and stats as JSON."""
    config = json.loads(Path(config_path).read_text())
    for entry in reversed(config["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)

    from itemadapter import ItemAdapter
    from scrapy import signals
    from scrapy.crawler import CrawlerProcess
    from scrapy.settings import Settings

    spider_cls = load_spider(config["spider"])
    concurrency = int(config["concurrency"])
    settings = Settings(
        {
            "LOG_LEVEL": "WARNING",
            "TELNETCONSOLE_ENABLED": False,
            "CONCURRENT_REQUESTS": concurrency,
            "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        }
    )
    settings.setdict(config["settings"], priority="cmdline")
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(spider_cls)
    items: list[dict[str, Any]] = []

    def on_item(item: Any) -> None:
        items.append(ItemAdapter(item).asdict())

    crawler.signals.connect(on_item, signal=signals.item_scraped)
    process.crawl(crawler, **config["spider_kwargs"])
    start, cpu = time.perf_counter(), time.process_time()
    process.start()
    seconds = time.perf_counter() - start
    assert crawler.stats is not None
    stats = crawler.stats.get_stats()
    stats["cpu_seconds"] = time.process_time() - cpu  # this process's CPU time in the crawl
    result = {
        "pages": int(stats.get("response_received_count", 0)),
        "items": items,
        "seconds": seconds,
        "stats": stats,
    }
    Path(config["out"]).write_text(json.dumps(result, default=str))


def main() -> None:
    """Measure the plain-Scrapy baseline on ``BookSite`` with the example spider."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return

    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from jobs.site_crawl import BooksSpider
    from support.sites import BookSite, SiteServer

    site = BookSite(args.pages)
    expected = site.expected_books()
    print(f"book site: {site.pages:,} pages, {len(expected):,} books")
    with SiteServer(site) as server:
        for run in range(1, args.repeat + 1):
            server.reset_hits()
            stats: dict[str, Any] = {}
            pages, items, seconds = crawl_plain(
                BooksSpider, server.url, args.concurrency, stats=stats
            )
            hits = server.hits
            ok = pages == site.pages and len(items) == len(expected)
            print(
                f"run {run}: plain Scrapy, CONCURRENT_REQUESTS={args.concurrency}:"
                f" {pages:,} pages, {len(items):,} items in {seconds:.2f}s"
                f" = {pages / seconds:,.0f} pages/s"
                f" ({stats['cpu_seconds'] / pages * 1000:.1f} ms CPU a page)"
                f" (server: {sum(hits.values()):,} requests, max {max(hits.values())} per path)"
                f"{'' if ok else '  MISMATCH'}"
            )


if __name__ == "__main__":
    main()
