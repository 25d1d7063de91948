"""``python tests/support/slow_store.py ARGS...`` is ``fanout ARGS...`` whose local
store writes a run's output files at ``$FANOUT_TEST_STORE_MBPS`` MB/s: a disk
(or an S3 upload) slower than this machine's, so that a chunk's commit takes a
time in proportion to what it wrote, as it does there.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO

from fanout.backends.local.store import DirStore
from fanout.cli import main

_put = DirStore.put


def _slow_put(self: DirStore, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> bool:
    started = time.monotonic()
    wrote = _put(self, key, data, if_absent=if_absent)
    if "/data/" in key:
        size = len(data) if isinstance(data, bytes) else data.tell()
        rate = float(os.environ["FANOUT_TEST_STORE_MBPS"]) * 1e6
        time.sleep(max(0.0, size / rate - (time.monotonic() - started)))
    return wrote


DirStore.put = _slow_put  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
