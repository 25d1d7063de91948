"""What says a file changed, for the caches keyed on files (loaded job modules,
parsed schemas)."""

from __future__ import annotations

import os

#: mtime and ctime (ns), size, inode.
Stamp = tuple[int, int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    """The stamp of a stat result. More than the mtime, which a copy can keep
    (``cp -p``, ``rsync -t``, an unpacked archive): the ctime cannot be set that
    way, and a file replaced by a rename (editors, ``git checkout``) has
    another inode."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
