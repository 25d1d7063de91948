"""``python tests/support/hang_after_put.py ARGS...`` is ``fanout ARGS...`` whose local
store hangs right after writing an output file whose key contains
``$FANOUT_TEST_HANG_AFTER_PUT`` (e.g. ``/data/0.5-s0-a1-``): the file is on disk
and the ledger commit that would make it count never comes, which is where a
worker killed between the two steps of the commit protocol leaves things.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO

from fanout.backends.local.store import DirStore
from fanout.cli import main

_put = DirStore.put


def _put_then_hang(
    self: DirStore, key: str, data: bytes | BinaryIO, *, if_absent: bool = False
) -> bool:
    wrote = _put(self, key, data, if_absent=if_absent)
    marker = os.environ.get("FANOUT_TEST_HANG_AFTER_PUT")
    if marker and marker in key:
        time.sleep(3600)  # until the test kills the worker
    return wrote


DirStore.put = _put_then_hang  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
