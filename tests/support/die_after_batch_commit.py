"""``python tests/support/die_after_batch_commit.py ARGS...`` is ``fanout ARGS...``
whose worker child SIGKILLs itself once (the first time, across processes: a
flag file at ``$FANOUT_TEST_DIE_FLAG``), inside a batch's commit: after the
ledger committed two or more finished chunks, and before the supervisor's note
of the batch says so. Their acks were deferred and die with the child, as with
a ``kill -9`` or the OOM killer landing there.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from fanout import batches
from fanout.cli import main

_flush = batches._Batch._flush


def _flush_then_die(self: Any) -> None:
    flag = os.environ["FANOUT_TEST_DIE_FLAG"]
    if len(self.ready) >= 2 and not os.path.exists(flag):
        open(flag, "w").close()
        self._tell = lambda: os.kill(os.getpid(), signal.SIGKILL)  # told after the commit
    _flush(self)


batches._Batch._flush = _flush_then_die  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
