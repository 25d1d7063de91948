"""``python tests/support/compact_mid_read.py ARGS...`` is ``fanout ARGS...``
whose local store compacts the table ``$FANOUT_TEST_COMPACT`` (all of it, into
files of 10 KB) just before the ``$FANOUT_TEST_COMPACT_AT``-th (default 3rd)
table file is opened: a ``fanout compact`` that swapped and deleted the files
of the catalog version a ``fanout read`` began with, in the middle of the read.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
from typing import Any

from fanout.backends.local.store import DirStore
from fanout.cli import main
from fanout.tables.compact import compact

_TABLE = os.environ.get("FANOUT_TEST_COMPACT", "")
_AT = int(os.environ.get("FANOUT_TEST_COMPACT_AT", "3"))
_opened = 0
_real_open = DirStore.open


def _open(self: DirStore, key: str, *args: Any, **kwargs: Any) -> Any:
    global _opened
    if _TABLE and key.startswith(f"tables/{_TABLE}/") and key.endswith(".avro"):
        _opened += 1
        if _opened == _AT:
            compact(self, _TABLE, target_bytes=10 * 1024)
    return _real_open(self, key, *args, **kwargs)


DirStore.open = _open  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
