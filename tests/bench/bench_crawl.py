"""Crawl benchmark: the same 5,000-page loopback site, crawled by plain Scrapy in
one process and by ``fanout run`` with 1 and 2 workers, in one run.

    python tests/bench/bench_crawl.py             # 5,000 pages
    python tests/bench/bench_crawl.py --pages 1000

Both sides run the same spider (jobs/site_crawl.py's BooksSpider) with the same
settings (Scrapy's defaults, CONCURRENT_REQUESTS and _PER_DOMAIN at 16). fanout
is forced through at least 20 chunks (pages_per_chunk = pages / 20). Figures
are pages per second over the crawl itself (plain: CrawlerProcess.start() to
its return; fanout: the run's own elapsed time, from submit to manifest), and
over the whole command for fanout. Not a test: CI does not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE), str(HERE.parent)]

from plain_scrapy import crawl_plain  # noqa: E402

from jobs.site_crawl import BooksSpider  # noqa: E402
from sites import BookSite, SiteServer  # noqa: E402

CONCURRENCY = 16

JOB = """
import sys
sys.path.insert(0, {root!r})
from jobs.site_crawl import BooksSpider
from fanout.crawl import CrawlJob

class Bench(BooksSpider):
    custom_settings = {{**BooksSpider.custom_settings,
                       "CONCURRENT_REQUESTS": {c}, "CONCURRENT_REQUESTS_PER_DOMAIN": {c}}}

job = CrawlJob(Bench, schema={schema!r}, name="bench-crawl", pages_per_chunk={per_chunk})
"""


def fanout_crawl(
    tmp: Path, server: SiteServer, workers: int, per_chunk: int
) -> tuple[int, float, float, int]:
    """(pages fetched, run seconds, command seconds, chunks) of one ``fanout run``."""
    job = tmp / f"bench_job_{workers}.py"
    schema = str(ROOT / "schemas" / "book.avsc")
    job.write_text(JOB.format(root=str(ROOT), c=CONCURRENCY, schema=schema, per_chunk=per_chunk))
    home = tmp / f"home-{workers}"
    server.reset_hits()
    cmd = [
        sys.executable,
        "-m",
        "fanout.cli",
        "--home",
        str(home),
        "run",
        str(job),
        "-p",
        f"start_url={server.url}",
        "-w",
        str(workers),
        "--chunk-timeout",
        "120",
        "--json",
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
    wall = time.perf_counter() - start
    status = json.loads(out.strip().splitlines()[-1])
    assert status["state"] == "succeeded", status
    pages = sum(server.hits.values())
    return pages, float(status["elapsed_s"]), wall, int(status["chunks"]["done"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=5000)
    args = parser.parse_args()
    site = BookSite(pages=args.pages)
    per_chunk = max(1, args.pages // 20)
    with tempfile.TemporaryDirectory() as tmp, SiteServer(site) as server:
        server.reset_hits()
        plain = crawl_plain(BooksSpider, server.url, CONCURRENCY)
        plain_pages = sum(server.hits.values())
        plain_rate = plain_pages / plain.seconds
        print(f"site: {args.pages:,} pages on 127.0.0.1, concurrency {CONCURRENCY}")
        print(
            f"plain scrapy, 1 process: {plain_rate:,.0f} pages/s"
            f" ({plain_pages:,} pages, {len(plain.items):,} items, {plain.seconds:.2f}s)"
        )
        for workers in (1, 2):
            pages, run_s, wall, chunks = fanout_crawl(Path(tmp), server, workers, per_chunk)
            rate, wall_rate = pages / run_s, pages / wall
            print(
                f"fanout run, {workers} worker{'s' if workers > 1 else ''}: {rate:,.0f} pages/s"
                f" ({pages:,} pages, {chunks} chunks, run {run_s:.2f}s, command {wall:.2f}s)"
                f" — ratio to plain {rate / plain_rate:.2f} (command {wall_rate / plain_rate:.2f})"
            )


if __name__ == "__main__":
    main()
