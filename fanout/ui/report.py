"""``fanout report RUN -o run.html``: the run's page as one self-contained
HTML file (stylesheet inline, charts as inline SVG, no script, no link that
needs the server), to attach to a ticket or an e-mail."""

from __future__ import annotations

from pathlib import Path

from markupsafe import Markup

from fanout.backends.base import Backend
from fanout.ui.render import render, static
from fanout.ui.views import run_cost, run_view


def report_html(backend: Backend, run_id: str) -> str:
    """The report of ``run_id`` as HTML text."""
    view = run_view(backend, run_id)
    return render(
        "report.html",
        view=view,
        cost=run_cost(view),
        read_only=True,
        csrf="",
        inline_css=Markup(static("fanout.css")),
        live_url=None,
        live_version="",
        report=True,
        chunk_href=None,
    )


def write_report(backend: Backend, run_id: str, out: Path) -> int:
    """Write the report to ``out``; returns its size in bytes."""
    data = report_html(backend, run_id).encode()
    out.write_bytes(data)
    return len(data)
