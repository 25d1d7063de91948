"""``fanout ui`` (the web dashboard) and ``fanout report`` (one run as a
self-contained HTML file). Registered on the group by :mod:`fanout.cli`.

Both need the ``ui`` extra (``pip install 'fanout[ui]'``): without it they say
so in one line (exit 2).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import click

from fanout.cli_common import RUN_ID, group_backend
from fanout.errors import UserError

#: Where the dashboard listens unless told otherwise.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "FANOUT_UI_TOKEN"
#: A token shorter than this is refused (it guards a non-loopback bind).
MIN_TOKEN = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _missing_extra(exc: ImportError) -> UserError:
    return UserError(f"the dashboard needs the ui extra: pip install 'fanout[ui]' ({exc.name})")


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--read-only", is_flag=True, help="Hide and refuse every action (Replay).")
@click.option(
    "--token",
    metavar="TOKEN",
    help=f"Require this token on every request (default: ${TOKEN_ENV}); needed off loopback.",
)
@click.pass_context
def ui(ctx: click.Context, host: str, port: int, read_only: bool, token: str | None) -> None:
    """Serve the web dashboard of this backend's runs and print its URL."""
    if token is not None and not token.strip():
        # `--token "$VAR"` with VAR unset: the user meant a guarded dashboard,
        # and would get an open one (on loopback) without a word.
        raise UserError("--token is empty (an unset variable?): give the token, or leave it out")
    token = token or os.environ.get(TOKEN_ENV) or None
    loopback = is_loopback(host)
    if not loopback and token is None:
        raise UserError(f"binding {host} (not loopback) needs a token: --token or ${TOKEN_ENV}")
    if token is not None and len(token) < MIN_TOKEN:
        raise UserError(f"the token must be at least {MIN_TOKEN} characters")
    try:
        import uvicorn

        from fanout.ui.app import LOOPBACK_HOSTS, UiConfig, create_app
    except ImportError as exc:
        raise _missing_extra(exc) from None
    backend = group_backend(ctx)
    # Without a token only loopback Host names are served (DNS rebinding); with
    # one, the token guards every request whatever name the browser used.
    config = UiConfig(
        backend,
        read_only=read_only,
        token=token,
        allowed_hosts=served_hosts(host, LOOPBACK_HOSTS) if token is None else None,
    )
    sock = _listen(host, port)
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), log_level="warning", access_log=False, lifespan="off")
    )
    shown = f"[{host}]" if ":" in host else host
    bound = sock.getsockname()[1]
    click.echo(f"fanout ui: http://{shown}:{bound}/" + ("?token=..." if token else ""))
    click.echo("Ctrl-C stops it", err=True)
    server.run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one line (exit 2)
    and the URL printed names the real port (``--port 0`` picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


@click.command()
@click.argument("run_id", type=RUN_ID)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    required=True,
    help="The HTML file to write.",
)
@click.pass_context
def report(ctx: click.Context, run_id: str, output: Path) -> None:
    """Write RUN's page as one self-contained HTML file (no network needed to open it)."""
    try:
        from fanout.ui.report import write_report
    except ImportError as exc:
        raise _missing_extra(exc) from None
    backend = group_backend(ctx)
    try:
        size = write_report(backend, run_id, output)
    except OSError as exc:  # a missing directory, a full disk, ...
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(f"wrote {output} ({size:,} bytes)")


def served_hosts(host: str, loopback: frozenset[str]) -> frozenset[str]:
    """The Host names served without a token: the loopback names, and the
    loopback address it was bound to (``--host 127.0.0.2`` printed its URL,
    then answered every request to it 400 "unexpected Host header")."""
    bare = host.strip("[]")
    return frozenset(loopback | {bare, f"[{bare}]"})
