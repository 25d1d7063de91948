"""The dashboard over HTTP (Starlette's TestClient): every page and the Replay
action, the escaping of a job's error text, and the safety checks (Host,
token, CSRF, read-only)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPT, Failed, drain, submit_broken

from fanout import coordinator
from fanout.backends.base import Backend, NewTask, RunRecord, RunState, TaskKey, TaskState

Client = Callable[..., Any]


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page has no action form"
    return found.group(1)


def assert_escaped(page: str) -> None:
    """The job's markup shows as text, never as markup."""
    assert SCRIPT not in page
    assert "<script>" not in page.replace('<script src="/static/live.js"></script>', "")
    assert html.escape(SCRIPT, quote=False).replace("'", "&#39;") in page or (
        "&lt;script&gt;alert(" in page
    )


# -- pages -------------------------------------------------------------------------


def test_runs_page_lists_runs_newest_first_with_filters(
    failed: Failed, make_client: Client
) -> None:
    ok = coordinator.submit(failed.backend, failed.run_id and _ok_job(), {})
    drain(failed.backend, ok.run_id)
    client = make_client(failed.backend)
    page = client.get("/")
    assert page.status_code == 200
    body = page.text
    assert body.index(ok.run_id) < body.index(failed.run_id)  # newest first
    assert '<span class="state failed">failed</span>' in body
    only_failed = client.get("/", params={"state": "failed"}).text
    assert failed.run_id in only_failed and ok.run_id not in only_failed
    by_job = client.get("/", params={"job": "tree"}).text
    assert ok.run_id in by_job and failed.run_id not in by_job
    assert "no runs match the filter" in client.get("/", params={"job": "nope"}).text
    bad = client.get("/", params={"state": "<b>odd</b>"})
    assert bad.status_code == 400 and "&lt;b&gt;odd&lt;/b&gt;" in bad.text


def _ok_job() -> str:
    from pathlib import Path

    return str(Path(__file__).parent.parent / "testjobs" / "tree.py")


def _fake_run(backend: Backend, n: int, state: RunState = RunState.SUCCEEDED) -> str:
    run_id = f"fake-20261203T1200{n:02d}-{n:06x}"
    backend.ledger.create_run(
        RunRecord(run_id, "fake.py", "fake", {}, {}, created_at=1_700_000_000.0 + n),
        NewTask("0", 0, 0, "{}"),
    )
    return run_id


class OtherLedger:
    """The ledger seen as any backend's (not SQLite's): the runs page falls back
    to ``list_runs``, as on DynamoDB."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("ledger", ["sqlite", "other"])
def test_runs_page_paginates_without_reading_tasks(
    local_backend: Backend, make_client: Client, monkeypatch: pytest.MonkeyPatch, ledger: str
) -> None:
    ids = [_fake_run(local_backend, n) for n in range(120)]

    def no_tasks(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the runs page read a run's tasks")

    monkeypatch.setattr(local_backend.ledger, "list_tasks", no_tasks)
    monkeypatch.setattr(local_backend.ledger, "get_task", no_tasks)
    if ledger == "other":
        monkeypatch.setattr(local_backend, "ledger", OtherLedger(local_backend.ledger))
    client = make_client(local_backend)
    newest_first = ids[::-1]
    seen: list[str] = []
    path = "/"
    pages = 0
    while path:
        body = client.get(path).text
        pages += 1
        shown = re.findall(r'<a href="/runs/([^"]+)">', body)
        assert shown == newest_first[len(seen) : len(seen) + 50]
        seen += shown
        assert ('rel="first"' in body) == (pages > 1)
        older = re.search(r'rel="next" href="([^"]+)"', body)
        path = html.unescape(older.group(1)) if older else ""
    assert pages == 3 and seen == newest_first
    assert client.get("/", params={"before": "nonsense"}).status_code == 400
    for cursor in ("nan~x", "1e999~x", "-inf~x", "12.5~"):
        assert client.get("/", params={"before": cursor}).status_code == 400, cursor
    # A filter rides along with the cursor.
    body = client.get("/", params={"job": "fake", "state": "running"}).text
    older = re.search(r'rel="next" href="([^"]+)"', body)
    assert older and "job=fake" in older.group(1) and "state=running" in older.group(1)


def test_run_page_shows_timeline_counts_tree_cost_and_escapes_errors(
    failed: Failed, make_client: Client
) -> None:
    page = make_client(failed.backend).get(f"/runs/{failed.run_id}")
    assert page.status_code == 200
    body = page.text
    assert_escaped(body)
    bars = re.findall(r'<rect class="bar" data-outcome="([a-z ]+)"', body)
    # plan 0, chunks 0/0..0/3, children 0/0/0 and 0/0/1: 7 attempts, 2 of them dead.
    assert sorted(bars) == ["committed"] * 5 + ["dead"] * 2
    assert "bad row 7" in body  # the dead bar's hover text
    assert re.search(r'<span class="state dead">dead</span></th><td class="num">2</td>', body)
    assert 'class="deadbranch"' in body  # the root's branch holds the dead chunks
    assert "Replay 2 dead chunks" in body
    assert "Estimated AWS cost" in body and "DynamoDB" in body
    assert "&#34;fail&#34;: [" in body or '"fail": [' in html.unescape(body)
    assert "data-live-url" not in body  # a finished run does not poll


def test_chunk_page_has_attempts_error_traceback_and_events(
    failed: Failed, make_client: Client
) -> None:
    client = make_client(failed.backend)
    page = client.get(f"/runs/{failed.run_id}/chunks/0/1")
    assert page.status_code == 200
    body = page.text
    assert_escaped(body)
    assert "Traceback (most recent call last)" in body
    assert "PermanentError" in body
    assert "Replay this chunk" in body
    assert "<td>permanent</td>" in body and "<td>dead</td>" in body
    # The error carries its kind ("error: ValueError...") and was labelled "error:" again.
    assert 'last failure: <span class="error">permanent: PermanentError' in body
    missing = client.get(f"/runs/{failed.run_id}/chunks/9/9")
    assert missing.status_code == 404 and "no chunk" in missing.text
    assert client.get("/runs/no-such-run").status_code == 404


def test_failures_group_errors_that_differ_in_numbers(failed: Failed, make_client: Client) -> None:
    page = make_client(failed.backend).get(f"/runs/{failed.run_id}/failures")
    assert page.status_code == 200
    body = page.text
    assert_escaped(body)
    # "bad row 7" and "bad row 14": one group, with a Replay button for it.
    assert body.count('name="group"') == 1
    assert "2 &times;" in body and "bad row #" in body
    assert body.count(">Replay</button>") == 2


def test_schedules_page_shows_next_fires_and_last_runs(
    local_backend: Backend, make_client: Client
) -> None:
    from fanout.schedules import Schedule, open_store
    from fanout.schedules.model import run_id_for

    start = datetime(2026, 1, 1, tzinfo=UTC)
    open_store(local_backend).add(
        Schedule(
            name="hourly", expression="0 * * * *", job="jobs/x.py", start=start, created_at=start
        )
    )
    now = datetime.now(UTC)
    last_tick = now.replace(minute=0, second=0, microsecond=0)
    run_id = run_id_for("hourly", last_tick - timedelta(hours=1))
    local_backend.ledger.create_run(
        RunRecord(run_id, "x.py", "x", {}, {}, created_at=1.0), NewTask("0", 0, 0, "{}")
    )
    body = make_client(local_backend).get("/schedules").text
    fires = re.findall(r"(\d{4}-\d\d-\d\dT\d\d:00:00Z)<br>", body)
    assert len(fires) == 5
    assert all(datetime.fromisoformat(f) > now for f in fires)
    assert f'href="/runs/{run_id}"' in body and '<span class="state running">' in body


def test_live_updates_send_the_charts_only_when_they_changed(
    local_backend: Backend, make_client: Client, tmp_path: Any
) -> None:
    flag = tmp_path / "flag"
    from conftest import submit_broken

    run_id = submit_broken(local_backend, flag)
    client = make_client(local_backend)
    page = client.get(f"/runs/{run_id}").text
    assert f'data-live-url="/runs/{run_id}?live=1"' in page
    assert '<script src="/static/live.js"></script>' in page
    live = client.get(f"/runs/{run_id}", params={"live": 1}).json()
    assert live["done"] is False and "running" in live["html"]["summary"]
    again = client.get(f"/runs/{run_id}", params={"live": 1, "v": live["v"]}).json()
    assert "charts" not in again["html"]  # nothing new to draw
    drain(local_backend, run_id)
    end = client.get(f"/runs/{run_id}", params={"live": 1, "v": live["v"]}).json()
    assert end["done"] is True and "succeeded" in end["html"]["summary"]
    assert 'data-outcome="committed"' in end["html"]["charts"]
    assert client.get("/static/live.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../app.py").status_code == 404


# -- actions -----------------------------------------------------------------------


def _dead(backend: Backend, run_id: str) -> list[str]:
    return [t.chunk_id for t in backend.ledger.list_tasks(run_id, (TaskState.DEAD,))]


def test_replay_all_then_the_run_succeeds(failed: Failed, make_client: Client) -> None:
    client = make_client(failed.backend)
    token = csrf_of(client.get(f"/runs/{failed.run_id}").text)
    failed.flag.unlink()  # the job is fixed
    done = client.post(f"/runs/{failed.run_id}/replay", data={"csrf": token, "all": "1"})
    assert done.status_code == 303 and done.headers["location"] == f"/runs/{failed.run_id}"
    assert coordinator.get_run(failed.backend, failed.run_id).state == RunState.RUNNING
    assert _dead(failed.backend, failed.run_id) == []
    assert drain(failed.backend, failed.run_id).state == RunState.SUCCEEDED


def test_replay_one_chunk_or_one_group(failed: Failed, make_client: Client) -> None:
    client = make_client(failed.backend)
    failures = client.get(f"/runs/{failed.run_id}/failures").text
    token = csrf_of(failures)
    one = client.post(f"/runs/{failed.run_id}/replay", data={"csrf": token, "chunk": "0/2"})
    assert one.status_code == 303
    assert _dead(failed.backend, failed.run_id) == ["0/1"]
    task = failed.backend.ledger.get_task(TaskKey(failed.run_id, "0/2", 0))
    assert task is not None and task.state == TaskState.QUEUED
    drain(failed.backend, failed.run_id)  # dies again: the flag is still there
    group = re.search(r'name="group" value="([0-9a-f]+)"', failures)
    assert group
    res = client.post(f"/runs/{failed.run_id}/replay", data={"csrf": token, "group": group[1]})
    assert res.status_code == 303
    assert _dead(failed.backend, failed.run_id) == []
    gone = client.post(f"/runs/{failed.run_id}/replay", data={"csrf": token, "group": "abc"})
    assert gone.status_code == 404


def test_actions_need_the_csrf_token_and_the_same_origin(
    failed: Failed, make_client: Client
) -> None:
    client = make_client(failed.backend)
    url = f"/runs/{failed.run_id}/replay"
    token = csrf_of(client.get(f"/runs/{failed.run_id}").text)
    assert client.post(url).status_code == 403
    assert client.post(url, data={"csrf": "x" + token}).status_code == 403
    evil = client.post(url, data={"csrf": token}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    # A sandboxed frame posts with "Origin: null": refused as well.
    assert client.post(url, data={"csrf": token}, headers={"Origin": "null"}).status_code == 403
    assert client.get(url).status_code == 405  # an action is never a GET
    # A form that names nothing is refused: it never means "all".
    assert client.post(url, data={"csrf": token}).status_code == 400
    assert _dead(failed.backend, failed.run_id) == ["0/1", "0/2"]


def test_read_only_hides_and_refuses_actions(failed: Failed, make_client: Client) -> None:
    writable = make_client(failed.backend)
    token = csrf_of(writable.get(f"/runs/{failed.run_id}").text)
    client = make_client(failed.backend, read_only=True, csrf=token)
    for path in ("", "/failures", "/chunks/0/1"):
        body = client.get(f"/runs/{failed.run_id}{path}").text
        assert "<form" not in body and "Replay" not in body
    refused = client.post(f"/runs/{failed.run_id}/replay", data={"csrf": token, "all": "1"})
    assert refused.status_code == 403 and "read-only" in refused.text
    assert _dead(failed.backend, failed.run_id) == ["0/1", "0/2"]


def test_ui_bound_to_another_loopback_address_serves_its_own_url(
    failed: Failed, make_client: Client
) -> None:
    # `fanout ui --host 127.0.0.2` printed http://127.0.0.2:PORT/ and then
    # answered every request there 400 (a black-box helper's find).
    from fanout.cli_ui import served_hosts
    from fanout.ui.app import LOOPBACK_HOSTS

    client = make_client(failed.backend, allowed_hosts=served_hosts("127.0.0.2", LOOPBACK_HOSTS))
    assert client.get("/", headers={"Host": "127.0.0.2:8765"}).status_code == 200
    assert client.get("/", headers={"Host": "evil.example:8765"}).status_code == 400


def test_host_and_token_checks(failed: Failed, make_client: Client) -> None:
    open_ = make_client(failed.backend)
    rebound = open_.get("/", headers={"Host": "evil.example:8765"})
    assert rebound.status_code == 400  # a DNS-rebinding page cannot read it
    secret = "s" * 24
    guarded = make_client(failed.backend, token=secret, allowed_hosts=None)
    assert guarded.get("/").status_code == 401
    assert guarded.get(f"/runs/{failed.run_id}").status_code == 401
    assert guarded.get("/", headers={"Authorization": f"Bearer {secret}x"}).status_code == 401
    assert guarded.get("/", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert guarded.get("/", headers={"Authorization": f"bearer {secret}"}).status_code == 200
    assert guarded.get("/", headers={"Authorization": f"Basic {secret}"}).status_code == 401
    assert guarded.get("/", params={"token": "wrong"}).status_code == 401
    trade = guarded.get("/", params={"token": secret, "state": "failed"})
    assert trade.status_code == 303 and trade.headers["location"] == "/?state=failed"
    assert "httponly" in trade.headers["set-cookie"].lower()
    # Not an open redirect: "//evil.example/" was sent on as a link to that host.
    away = guarded.get(
        "http://testserver//evil.example/", params={"token": secret}, follow_redirects=False
    )
    assert away.status_code == 303 and away.headers["location"] == "/evil.example/"
    # The cookie now rides along (TestClient keeps it), a POST needs CSRF as well.
    assert guarded.get("/").status_code == 200
    url = f"/runs/{failed.run_id}/replay"
    assert guarded.post(url).status_code == 403
    guarded.cookies.clear()
    token = open_.app.state.config.csrf
    assert guarded.post(url, data={"csrf": token, "all": "1"}).status_code == 401


def test_every_page_sends_a_strict_content_security_policy(
    failed: Failed, make_client: Client
) -> None:
    client = make_client(failed.backend)
    for path in ("/", "/schedules", f"/runs/{failed.run_id}", f"/runs/{failed.run_id}/failures"):
        res = client.get(path)
        assert res.status_code == 200
        csp = res.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert res.headers["x-frame-options"] == "DENY"
        # The only script is the live one, from the server itself.
        assert re.findall(r"<script[^>]*>", res.text) in ([], ['<script src="/static/live.js">'])


def test_cancel_a_running_run_from_its_page(
    local_backend: Backend, tmp_path: Path, make_client: Client
) -> None:
    run_id = submit_broken(local_backend, tmp_path / "no-flag")  # queued, not yet worked
    client = make_client(local_backend)
    page = client.get(f"/runs/{run_id}").text
    assert "Cancel run" in page
    token = csrf_of(page)
    assert client.post(f"/runs/{run_id}/cancel").status_code == 403  # no CSRF token
    done = client.post(f"/runs/{run_id}/cancel", data={"csrf": token})
    assert done.status_code == 303 and done.headers["location"] == f"/runs/{run_id}"
    assert coordinator.get_run(local_backend, run_id).state == RunState.CANCELLED
    assert "Cancel run" not in client.get(f"/runs/{run_id}").text  # it ended
    read_only = make_client(local_backend, read_only=True, csrf=token)
    other = submit_broken(local_backend, tmp_path / "no-flag")
    assert "Cancel run" not in read_only.get(f"/runs/{other}").text
    refused = read_only.post(f"/runs/{other}/cancel", data={"csrf": token})
    assert refused.status_code == 403
    assert coordinator.get_run(local_backend, other).state == RunState.RUNNING
