"""The Jinja2 environment of the dashboard and the report: templates shipped
in the package, autoescape on for every template (a job's error text, payload
or log line is always escaped), and the page's stylesheet and live script."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from fanout.cli_common import human, utc_time
from fanout.controls import chunks_ran
from fanout.ui import svg
from fanout.ui.views import duration


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@cache
def environment() -> Environment:
    """The shared environment (templates are compiled once)."""
    env = Environment(
        loader=PackageLoader("fanout.ui", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        utc=lambda at: utc_time(float(at)) if at else "-",
        dur=duration,
        human=human,
        pretty=_pretty,
        thousands=lambda n: f"{int(n):,}",
        ran=chunks_ran,
    )
    env.globals.update(
        timeline_svg=svg.timeline_svg, rate_svg=svg.rate_svg, legend=svg.legend, colours=svg.COLOURS
    )
    return env


def static(name: str) -> str:
    """A file of ``fanout/ui/static`` (the stylesheet, the live script)."""
    return resources.files("fanout.ui").joinpath("static", name).read_text()


def render(template: str, **context: Any) -> str:
    """``template`` rendered with ``context``."""
    return environment().get_template(template).render(**context)
