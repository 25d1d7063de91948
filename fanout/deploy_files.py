"""What ``fanout deploy`` packs into the function's zip: the installed ``fanout``
package (less what never runs on Lambda) and the project's ``jobs/`` and
``schemas/``, without tests, docs or caches; links followed as ``ctx.list``
follows them, but never out of the project."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import fanout
from fanout.errors import UserError

__all__ = ["EXCLUDED_DIRS", "PROJECT_DIRS", "zip_entries"]

#: Directories of the user's project that go into the zip besides ``fanout``.
PROJECT_DIRS = ("jobs", "schemas")
#: Subpackages of fanout the function never imports: the dashboard, whose
#: libraries (the ``ui`` extra) are not in the layer.
NOT_ON_LAMBDA = ("fanout/ui/",)

#: Directory names never packaged: tests, docs and caches are not needed at run
#: time and would only make the zip larger (and non-reproducible, for caches).
EXCLUDED_DIRS = frozenset(
    {"__pycache__", "tests", "test", "docs", "doc", ".git", ".mypy_cache", ".pytest_cache"}
)
EXCLUDED_SUFFIXES = frozenset({".pyc", ".pyo"})


def _files(base: Path, prefix: str, within: Path) -> Iterator[tuple[str, Path]]:
    """``(archive name, path)`` of the files under ``base`` worth packaging.
    Links are followed as ``ctx.list`` follows them, so a job finds on Lambda
    what it finds here (a directory linked back up is not walked again), but
    only to a target inside ``within`` (the project): one out of it could ship
    any file of this machine (a key)."""
    _inside(base, prefix, within)
    yield from _walk(base, base, prefix, within, frozenset())


def _walk(
    directory: Path, base: Path, prefix: str, within: Path, above: frozenset[Path]
) -> Iterator[tuple[str, Path]]:
    real = directory.resolve()
    if real in above:  # a link back up to a directory being walked: a cycle
        return
    above = above | {real}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        is_dir = entry.is_dir()  # (following a link)
        if entry.name in EXCLUDED_DIRS if is_dir else path.suffix in EXCLUDED_SUFFIXES:
            continue
        name = f"{prefix}/{path.relative_to(base).as_posix()}"
        _inside(path, name, within)
        if is_dir:
            yield from _walk(path, base, prefix, within, above)
        elif entry.is_file():  # (not a FIFO, a socket, a dangling link)
            yield name, path


def _inside(path: Path, shown: str, within: Path) -> None:
    """:class:`UserError` for a symbolic link whose target is outside ``within``."""
    if path.is_symlink() and not path.resolve().is_relative_to(within):
        raise UserError(
            f"{shown} is a link to {path.resolve()}, outside {within}: deploy ships no"
            " file from outside the project (copy it in, or remove the link)"
        )


def zip_entries(root: Path) -> list[tuple[str, Path]]:
    """What :func:`build_zip` packs, sorted by archive name."""
    package = Path(fanout.__file__).resolve().parent
    entries = [e for e in _files(package, "fanout", package) if not e[0].startswith(NOT_ON_LAMBDA)]
    project = root.resolve()
    for name in PROJECT_DIRS:
        directory = root / name
        if directory.is_dir():
            entries.extend(_files(directory, name, project))
    return sorted(entries)
