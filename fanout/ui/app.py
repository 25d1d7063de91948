"""The dashboard's Starlette application: pages, live updates, the Replay and Cancel actions
and the checks that keep it safe to leave open.

Safety (see the README's Dashboard section):

- the server binds 127.0.0.1 unless told otherwise (:mod:`fanout.cli_ui`);
  without a token, only requests whose ``Host`` is a loopback name are served,
  so a web page that rebinds its own domain to 127.0.0.1 cannot read the
  dashboard (nor so its CSRF token);
- with a token (required to bind any other address) every request must carry
  it: ``Authorization: Bearer``, or the ``fanout_ui_token`` cookie that opening
  ``/?token=...`` once sets;
- every action is a POST carrying the server's CSRF token (and, when the
  browser sends an ``Origin``, one naming this server);
- ``read_only`` hides the actions and answers 403 to every POST;
- every page is rendered with autoescape on, and served with a
  Content-Security-Policy that runs no inline script: the one script is
  ``/static/live.js``, which puts server-escaped HTML in place.

Endpoints are plain functions: Starlette runs them in its thread pool, so the
backend's blocking calls (SQLite, boto3) never hold up the event loop.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from fanout import control_ops, coordinator
from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunState
from fanout.cli_observe import progress
from fanout.errors import UnknownRunError, UserError
from fanout.ui import views
from fanout.ui.render import render, static

TOKEN_COOKIE = "fanout_ui_token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: A run page's charts are rebuilt at most this often (seconds), or every
#: REFRESH_FACTOR times as long as the last build took, so the open pages of a
#: run cost at most a twentieth of one core (MAX_REFRESH caps the wait).
MIN_REFRESH = 1.0
MAX_REFRESH = 30.0
REFRESH_FACTOR = 20
#: Run views kept (each holds its run's tasks): the most recently built.
MAX_CACHED = 8
STATIC = {"fanout.css": "text/css", "live.js": "text/javascript"}


@dataclass
class UiConfig:
    """How the dashboard is served."""

    backend: Backend
    read_only: bool = False
    token: str | None = None
    #: Host names requests may name (None: any, when a token guards the server).
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))


@dataclass
class _Cached:
    view: views.RunView
    took: float  # seconds the build took


class RunViews:
    """Built run views, shared by every open page of a run: however many pages
    poll, a run's tasks are read at most once per refresh interval."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self.builds = 0  # for tests and measurements

    def get(self, run_id: str) -> views.RunView:
        """The run's view, rebuilt when the run changed and the last build is
        older than the refresh interval (or the run just ended)."""
        run = coordinator.get_run(self.backend, run_id)
        with self._lock:
            cached = self._cache.get(run_id)
        now = time.time()
        if cached is not None:
            old = cached.view
            unchanged = old.run.updated_at == run.updated_at and old.run.state == run.state
            wait = min(MAX_REFRESH, max(MIN_REFRESH, REFRESH_FACTOR * cached.took))
            ended = run.state in TERMINAL_RUN_STATES and old.run.state not in TERMINAL_RUN_STATES
            if unchanged or (now - old.built_at < wait and not ended):
                # The counters come from the run record, read just now.
                # paused: no change of the run's, but one of its shown state
                st, shown = coordinator.live_status(self.backend, run, old.counts)
                return dataclasses.replace(old, run=run, progress=progress(st, shown))
        started = time.perf_counter()
        view = views.run_view(self.backend, run_id, now)
        with self._lock:
            self._cache.pop(run_id, None)
            self._cache[run_id] = _Cached(view, time.perf_counter() - started)
            while len(self._cache) > MAX_CACHED:
                del self._cache[next(iter(self._cache))]  # the least recently built
            self.builds += 1
        return view


def _page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
    config: UiConfig = request.app.state.config
    base: dict[str, Any] = {
        "read_only": config.read_only,
        "csrf": config.csrf,
        "inline_css": None,
        "live_url": None,
        "live_version": "",
        "report": False,
        "chunk_href": None,
    }
    return HTMLResponse(render(template, **{**base, **context}), status_code=code)


def _context(request: Request) -> dict[str, Any]:
    config: UiConfig = request.app.state.config
    return {"read_only": config.read_only, "csrf": config.csrf, "report": False}


def _chunk_href(run_id: str) -> Callable[[str], str]:
    prefix = f"/runs/{quote(run_id, safe='')}/chunks/"
    return lambda chunk_id: prefix + quote(chunk_id, safe="/")


def _live(request: Request) -> bool:
    return request.query_params.get("live") == "1"


# -- pages -------------------------------------------------------------------------


def runs_page(request: Request) -> Response:
    """Every run, newest first, filtered by state and job, paginated."""
    q = request.query_params
    state = views.parse_state(q.get("state"))
    job = q.get("job") or None
    config: UiConfig = request.app.state.config
    data = views.runs_page(config.backend, views.parse_cursor(q.get("before")), state, job)

    def pager(before: str | None) -> str:
        args = {k: v for k, v in (("state", data.state), ("job", job), ("before", before)) if v}
        return "/?" + urlencode(args) if args else "/"

    context: dict[str, Any] = {"page": data, "pager": pager, "states": [s.value for s in RunState]}
    if _live(request):
        html = render("_runs_table.html", **_context(request), **context)
        return JSONResponse({"html": {"runs": html}, "done": not data.live})
    live_url = None
    if data.live:
        live_url = f"{request.url.path}?{urlencode({**dict(q), 'live': '1'})}"
    return _page(request, "runs.html", live_url=live_url, **context)


def run_page(request: Request) -> Response:
    """A run: progress, timeline, throughput, chunk tree, cost, settings."""
    run_id = request.path_params["run_id"]
    cache: RunViews = request.app.state.views
    view = cache.get(run_id)
    version = f"{view.built_at:.6f}"
    context: dict[str, Any] = {"view": view, "chunk_href": _chunk_href(run_id)}
    done = view.run.state in TERMINAL_RUN_STATES
    if _live(request):
        html = {"summary": render("_run_summary.html", **_context(request), **context)}
        if request.query_params.get("v") != version:
            html["charts"] = render("_run_charts.html", **_context(request), **context)
        return JSONResponse({"html": html, "done": done, "v": version})
    live_url = None if done else f"/runs/{quote(run_id, safe='')}?live=1"
    cost = views.run_cost(view)
    return _page(request, "run.html", live_url=live_url, live_version=version, cost=cost, **context)


def failures_page(request: Request) -> Response:
    """The run's dead chunks grouped by error, with Replay buttons."""
    run_id = request.path_params["run_id"]
    config: UiConfig = request.app.state.config
    run, groups = views.failure_groups(config.backend, run_id)
    context: dict[str, Any] = {
        "run": run,
        "groups": groups,
        "total": sum(len(g.tasks) for g in groups),
    }
    done = run.state in TERMINAL_RUN_STATES
    if _live(request):
        html = render("_failures.html", **_context(request), **context)
        return JSONResponse({"html": {"failures": html}, "done": done})
    live_url = None if done else f"{request.url.path}?live=1"
    return _page(request, "failures.html", live_url=live_url, **context)


def chunk_page(request: Request) -> Response:
    """One chunk: its slices, attempts, checkpoints, errors and log events."""
    run_id, chunk_id = request.path_params["run_id"], request.path_params["chunk_id"]
    config: UiConfig = request.app.state.config
    view = views.chunk_view(config.backend, run_id, chunk_id)
    done = view.run.state in TERMINAL_RUN_STATES
    if _live(request):
        html = render("_chunk.html", **_context(request), view=view)
        return JSONResponse({"html": {"chunk": html}, "done": done})
    live_url = None if done else f"{request.url.path}?live=1"
    return _page(request, "chunk.html", live_url=live_url, view=view)


def schedules_page(request: Request) -> Response:
    """Every schedule, its next five fire times and the last runs it started."""
    config: UiConfig = request.app.state.config
    return _page(request, "schedules.html", rows=views.schedules_view(config.backend))


def static_file(request: Request) -> Response:
    """The stylesheet and the live script (nothing else is served from disk)."""
    name = request.path_params["name"]
    if name not in STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(static(name), media_type=STATIC[name])


# -- actions -----------------------------------------------------------------------


async def checked_form(request: Request) -> FormData:
    """The action's form, if it carries the server's CSRF token; else
    :class:`Refused` (403)."""
    config: UiConfig = request.app.state.config
    form = await request.form()
    token = form.get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), config.csrf.encode()):
        raise Refused("missing or wrong CSRF token")
    return form


class Refused(Exception):
    """An action refused (answered 403 with its message)."""


async def replay(request: Request) -> Response:
    """Replay the run's dead chunks: ``all``, one failure ``group`` or the
    ``chunk`` ids named (a form that names none of them is refused: an empty
    form must never mean "all"). Redirects to the run's page."""
    form = await checked_form(request)
    run_id = request.path_params["run_id"]
    config: UiConfig = request.app.state.config
    chunks = [str(c) for c in form.getlist("chunk") if c]
    group = form.get("group")
    everything = form.get("all") == "1"
    if not (chunks or everything or (isinstance(group, str) and group)):
        raise UserError("say what to replay: all=1, a group or chunk ids")

    def act() -> None:
        named: list[str] | None = chunks or None
        if isinstance(group, str) and group:
            named = views.group_chunks(config.backend, run_id, group)
        coordinator.replay(config.backend, run_id, None if everything else named)

    await run_in_threadpool(act)
    return RedirectResponse(f"/runs/{quote(run_id, safe='')}", status_code=303)


async def cancel(request: Request) -> Response:
    """Cancel a running run (``fanout cancel``): its queued chunks at once, its
    running ones at their next checkpoint. Redirects to the run's page."""
    await checked_form(request)
    run_id = request.path_params["run_id"]
    config: UiConfig = request.app.state.config
    await run_in_threadpool(control_ops.cancel, config.backend, run_id)
    return RedirectResponse(f"/runs/{quote(run_id, safe='')}", status_code=303)


# -- the checks --------------------------------------------------------------------


def _host(request: Request) -> str:
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain")


class Guard(BaseHTTPMiddleware):
    """Host, token, read-only and CSRF checks, and the security headers."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await self._check(request, call_next)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null"
        # on its own form posts, which the origin check must refuse.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _check(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        config: UiConfig = request.app.state.config
        if config.allowed_hosts is not None and _host(request) not in config.allowed_hosts:
            return _plain(400, "unexpected Host header (the dashboard answers to 127.0.0.1)")
        if config.token is not None:
            given = request.query_params.get("token")
            if given is not None and request.method == "GET":
                if not hmac.compare_digest(given.encode(), config.token.encode()):
                    return _plain(401, "wrong token")
                # Trade the token in the URL for a cookie, and drop it from the URL.
                rest = {k: v for k, v in request.query_params.items() if k != "token"}
                # One leading slash: "//evil.example/" would send the browser
                # to another host (an open redirect).
                path = "/" + request.url.path.lstrip("/")
                target = path + (f"?{urlencode(rest)}" if rest else "")
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(
                    TOKEN_COOKIE, config.token, httponly=True, samesite="strict", path="/"
                )
                return response
            auth = request.headers.get("authorization", "")
            scheme, _, credentials = auth.partition(" ")
            # The scheme is case-insensitive (RFC 9110): "bearer x" is "Bearer x".
            presented = credentials.strip() if scheme.lower() == "bearer" else None
            presented = presented or request.cookies.get(TOKEN_COOKIE)
            if presented is None or not hmac.compare_digest(
                presented.encode(), config.token.encode()
            ):
                return _plain(401, "this dashboard needs its token (open /?token=...)")
        if request.method != "GET" and request.method != "HEAD":
            if config.read_only:
                return _plain(403, "the dashboard is read-only")
            origin = request.headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
                return _plain(403, "cross-origin request refused")
            # The CSRF token is in the form, which the action reads (checked_form):
            # a body read here would not reach the endpoint.
        return await call_next(request)


async def _refused(request: Request, exc: Exception) -> Response:
    return _plain(403, str(exc))


async def _user_error(request: Request, exc: Exception) -> Response:
    """A bad request or an unknown run: one escaped line on the error page."""
    if isinstance(exc, UnknownRunError | views.NotFound):
        return _page(request, "error.html", 404, title="not found", message=str(exc))
    return _page(request, "error.html", 400, title="bad request", message=str(exc))


def create_app(config: UiConfig) -> Starlette:
    """The dashboard for ``config.backend``."""
    routes = [
        Route("/", runs_page),
        Route("/schedules", schedules_page),
        Route("/static/{name}", static_file),
        Route("/runs/{run_id}", run_page),
        Route("/runs/{run_id}/failures", failures_page),
        Route("/runs/{run_id}/chunks/{chunk_id:path}", chunk_page),
        Route("/runs/{run_id}/replay", replay, methods=["POST"]),
        Route("/runs/{run_id}/cancel", cancel, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard)],
        exception_handlers={UserError: _user_error, Refused: _refused},
    )
    app.state.config = config
    app.state.views = RunViews(config.backend)
    return app
