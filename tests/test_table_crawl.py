"""A crawl's output as a partitioned table: the example books spider, unmodified,
partitioned by its items' rating (``fanout.tables`` through ``CrawlJob``)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import avro.datafile
import avro.io
import pytest
from test_tables import drain  # the one place the table tests reach the engine

from fanout import coordinator
from fanout.backends.base import Backend
from fanout.tables.catalog import read_catalog

ROOT = Path(__file__).parent.parent

JOB = """
import importlib.util

from fanout.crawl import CrawlJob

_spec = importlib.util.spec_from_file_location("books_example", {example!r})
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)

job = CrawlJob(
    _example.BooksSpider, schema={schema!r}, partition_by="rating", table="books",
    pages_per_chunk=5,
)
"""


@pytest.fixture
def site() -> Iterator[str]:
    """The example books site (jobs/site), served on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=ROOT / "jobs" / "site",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the site did not start"
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_crawl_lands_in_a_table_partitioned_by_rating(
    ledger: Backend, site: str, tmp_path: Path
) -> None:
    job = tmp_path / "books_table.py"
    job.write_text(
        JOB.format(
            example=str(ROOT / "jobs" / "site_crawl.py"),
            schema=str(ROOT / "schemas" / "book.avsc"),
        )
    )
    run = coordinator.submit(ledger, str(job), {"start_url": site})
    r = drain(ledger, run.run_id, limit=120.0)
    assert r.state == "succeeded"
    assert r.tasks_total > 2  # several chunks wrote to the table

    catalog = read_catalog(ledger.store, "books")
    assert catalog is not None
    urls: Counter[str] = Counter()
    for f in catalog.files:
        reader = avro.datafile.DataFileReader(
            io.BytesIO(ledger.store.get(f["key"])), avro.io.DatumReader()
        )
        with reader:
            for book in reader:
                assert f["partition"] == f"rating={book['rating']}"
                urls[book["url"]] += 1
    assert len(urls) == 24  # the site's 24 books
    assert set(urls.values()) == {1}  # each once
    partitions = {f["partition"] for f in catalog.files}
    assert len(partitions) > 1 and partitions <= {f"rating={n}" for n in range(1, 6)}
