"""Run params are the spider's arguments (``scrapy crawl -a``): one its
``__init__`` does not take is refused at submit, in one line; and a spider
whose construction fails fails its chunk, not a run that "succeeds" with no
record (a black-box helper's find: the exception was lost in the crawl's
Deferred, the chunk process exited 0, and every chunk did the same)."""

from __future__ import annotations

import json
from pathlib import Path

from support.cli import assert_user_error, cli, ok
from support.procs import fanout

JOB = """
import scrapy
from fanout.crawl import CrawlJob


class Strict(scrapy.Spider):
    name = "strict"
    custom_settings = {"ROBOTSTXT_OBEY": False}

    def __init__(self, start_url="http://127.0.0.1:9/"):
        super().__init__()
        if not start_url.startswith("http"):
            raise ValueError(f"start_url {start_url!r} is no URL")
        self.start_urls = [start_url]

    def parse(self, response):
        yield {"url": response.url}


job = CrawlJob(Strict, schema={"type": "record", "name": "page",
                               "fields": [{"name": "url", "type": "string"}]})
"""


def test_a_param_the_spider_does_not_take_is_refused_at_submit(tmp_path: Path) -> None:
    job = tmp_path / "strict.py"
    job.write_text(JOB)
    home = tmp_path / "home"
    for command in ("validate", "submit", "run"):
        assert_user_error(
            cli(home, command, str(job), "-p", "start-url=http://x/"),
            "params for job strict: spider Strict:",
            "'start-url'",
            "its __init__ takes: start_url",
        )
    assert not (home / "fanout.db").exists() or "strict" not in ok(cli(home, "runs"))


def test_a_spider_whose_construction_fails_fails_its_chunk(tmp_path: Path) -> None:
    job = tmp_path / "strict.py"
    job.write_text(JOB)
    home = tmp_path / "home"
    result = fanout(home, "run", str(job), "-p", "start_url=ftp:/x", "-S", "max_attempts=1")
    assert result.returncode == 1, result.stdout + result.stderr
    run = json.loads(ok(cli(home, "runs", "--json")).splitlines()[0])
    assert run["state"] == "failed", run
    failed = ok(cli(home, "failed", run["run_id"]))
    assert "ValueError: start_url 'ftp:/x' is no URL" in failed, failed
