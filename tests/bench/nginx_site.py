"""Serve a static ``HardSite`` (``traps=False``) with nginx, for the crawl benchmark.

    with NginxSite(HardSite(5000, traps=False), backlog=5) as server:
        crawl(server.url)
        pages = sum(server.hits.values())

The site's pages are written as files into a temporary directory (``/`` as
``index.html``, ``/p/N`` as ``p/N``, ``/robots.txt``) with their links filled in
for the chosen port, and nginx serves them on ``127.0.0.1`` only, as the
current user, from a generated config in that directory: ``daemon off`` (it is
this process's child), one worker process (one core at most), keep-alive on,
``default_type text/html``, ``listen ... backlog=N``, its pid file, error log,
temp paths and access log in the directory. The access log holds one line per
request (its request URI, unbuffered: one ``write`` a request), which is how
``hits`` counts requests per path, as ``SiteServer.hits`` does.

``stop()`` (or leaving the ``with``) ends nginx and removes the directory,
also on error; nginx is started with ``PR_SET_PDEATHSIG`` so it ends with this
process even if this process is killed outright.

nginx is not a dependency of the project (CI does not run the benchmark):
install it with ``apt-get install -y nginx`` (Debian's package; only the
binary is used, its service need not run).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import TracebackType

from support.hardsite import HardSite

#: Where Debian puts nginx (``/usr/sbin`` is not on every user's PATH).
NGINX_PATHS = ("/usr/sbin/nginx",)
PR_SET_PDEATHSIG = 1

CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ text/plain txt; }}
    default_type text/html;
    log_format uri '$request_uri';
    access_log {tmp}/access.log uri;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    open_file_cache max=100000 inactive=600s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        server_name _;
        root {tmp}/site;
        index index.html;
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or where Debian installs it; None if neither."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A port free on 127.0.0.1 now (nginx binds it a moment later; a clash fails loudly)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class NginxSite:
    """nginx serving a static ``HardSite`` on 127.0.0.1 (see the module docstring)."""

    host = "127.0.0.1"

    def __init__(self, site: HardSite, *, backlog: int = 511, binary: str | None = None) -> None:
        if site.traps:
            raise ValueError("nginx serves static pages: HardSite(traps=False) only")
        if site.hosts != 1:
            raise ValueError("nginx serves one host name: HardSite(hosts=1) only")
        self.site = site
        self.backlog = backlog
        self.binary = binary or find_nginx()
        self.port = 0
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """The site's root URL."""
        return f"http://{self.host}:{self.port}/"

    def _write_site(self, root: Path) -> None:
        host = f"{self.host}:{self.port}"
        (root / "p").mkdir(parents=True)
        (root / "robots.txt").write_bytes(self.site.robots())
        for key, body in self.site.bodies.items():
            path = root / "index.html" if key == "/" else root / key.lstrip("/")
            path.write_bytes(self.site._fill(body, host))

    def _config(self, tmp: Path) -> str:
        # As root, nginx would switch its worker to "nobody", which cannot read
        # the 0700 temp dir: keep it the current user. (Not root: the directive
        # would only earn a warning.)
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        return CONFIG.format(user=user, tmp=tmp, port=self.port, backlog=self.backlog)

    def start(self) -> NginxSite:
        """Write the site and config, start nginx, wait until it accepts; returns self."""
        if self._proc is not None:
            raise RuntimeError("nginx already started")
        if self.binary is None:
            raise RuntimeError("nginx not found (apt-get install -y nginx)")
        self._tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        try:
            self.port = free_port()
            self._write_site(self._tmp / "site")
            (self._tmp / "access.log").touch()
            conf = self._tmp / "nginx.conf"
            conf.write_text(self._config(self._tmp))
            # -e: the error log before the config is read (else /var/log/nginx).
            cmd = [self.binary, "-p", str(self._tmp), "-e", str(self._tmp / "error.log")]
            self._proc = subprocess.Popen(
                [*cmd, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"nginx exited with {self._proc.returncode}: {err.strip()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not accept on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        """End nginx (fast shutdown, then kill) and remove its directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: nginx's fast shutdown
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> NginxSite:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what was served ------------------------------------------------------------------

    def _log(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("nginx not started")
        return self._tmp / "access.log"

    def reset_hits(self) -> None:
        """Count requests from now on."""
        self._log_offset = self._log().stat().st_size

    @property
    def hits(self) -> Counter[str]:
        """Requests per request URI since ``reset_hits`` (from nginx's access log;
        a request is logged when its reply has been sent)."""
        with self._log().open("rb") as log:
            log.seek(self._log_offset)
            return Counter(line.decode() for line in log.read().splitlines())

    def worker_cpu_seconds(self) -> float:
        """CPU seconds (user + system) nginx's processes have used so far."""
        if self._proc is None:
            return 0.0
        pids = [self._proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            pids += [int(p) for p in children.read_text().split()]
        ticks = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")
