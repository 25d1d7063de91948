"""A site that goes away in the middle of a crawl and comes back (a restart, a
deploy) is waited for, not given up page by page (``fanout/crawl/throttle.py``).

Through the CLI: ``fanout run`` crawls a 200-page site; after 40 pages the site
goes away for 8 s, in two ways: the server stops listening (connections
refused), then listens again on the same port; or a proxy answers 502 to every
page (the application behind it restarting). The run must succeed with every
item once, hardly a page given up (each used to become a chunk of its own,
several rounds each), and the site's pages must have been held back: the crawl counted
the failures as the site's (``unreachable``).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from fanout.crawl.throttle import DOWN_AFTER
from support.helpers import JOBS
from support.lambda_source import checkout_pythonpath
from support.procs import CLI, fanout
from support.sites import HubSite, SiteServer

JOB = str(JOBS / "hard_crawl.py")
PAGES = 200
#: How long the site is down: past a page's given-up rounds at the test jobs'
#: 1 s throttle_base (hard_crawl.THROTTLE_BASE), as a minute is at the default 5 s.
DOWN = 8.0


@pytest.mark.parametrize("how", ["refused", "502"])
def test_a_site_away_for_a_while_mid_crawl_is_waited_for_and_every_page_kept(
    home: Path, how: str
) -> None:
    hub = HubSite(PAGES)
    site = SiteServer(hub).start()
    port = site.port
    back = None
    command = [*CLI, "--home", str(home), "run", f"{JOB}:tutorial", "-p", f"start_url={site.url}"]
    proc = subprocess.Popen(
        [*command, "-S", "pages_per_chunk=20", "-w", "2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )
    # Drained as it comes: a full pipe would block the crawl's logging.
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
        threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 60
        while sum(site.hits.values()) < 40:
            assert proc.poll() is None and time.monotonic() < deadline, "the crawl ended early"
            time.sleep(0.005)
        if how == "refused":
            site.stop()  # connections refused from now on
            time.sleep(DOWN)
            back = SiteServer(hub, port=port).start()
        else:
            hub.away = True
            time.sleep(DOWN)
            hub.away = False
        code = proc.wait(timeout=120)
        for reader in readers:
            reader.join(timeout=10)
        st = json.loads(out[0].strip().splitlines()[-1])
        if code != 0:
            # Known gap (the README's): answering 502, the site cannot be told
            # from broken pages by a chunk with fewer than DOWN_AFTER pages left;
            # those are given up, and one whose rounds all fall where the run
            # was not backing the site off dies. Nothing is lost: a replay
            # fetches it. (About 1 run in 10 here; refused connections never.)
            assert how == "502" and st["state"] == "failed", "".join(err)[-3000:]
            assert st["chunks"]["dead"] < DOWN_AFTER, st
            replay = fanout(home, "replay", st["run_id"], "--work", "-w", "2", timeout=120)
            assert replay.returncode == 0, replay.stderr[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        site.stop()
        if back is not None:
            back.stop()

    assert st["stats"].get("unreachable", 0) > 0, st["stats"]  # the outage was met
    # Some 30 pages were given up, each a chunk of its own, before (in the 502
    # mode, some died and the run failed). A chunk with fewer than DOWN_AFTER
    # pages left when the site went away cannot tell it from broken pages:
    # those few are given up (a page once per round), and fetched in their
    # rounds, held while the run backs the site off, or once it is back.
    assert st["stats"].get("given_up", 0) < 3 * DOWN_AFTER, st["stats"]
    cat = fanout(home, "cat", st["run_id"])
    assert cat.returncode == 0, cat.stderr
    ids = Counter(json.loads(line)["id"] for line in cat.stdout.splitlines())
    assert ids == Counter({f"p{n}": 1 for n in range(PAGES)})
