"""``python tests/kill_at.py ARGS...`` is ``fanout ARGS...`` whose local store
kills its own process (SIGKILL: no cleanup, no ``finally``) right after the
``$FANOUT_TEST_KILL_NTH``-th (default 1st) ``$FANOUT_TEST_KILL_OP`` (``put`` or
``delete``) of a key containing ``$FANOUT_TEST_KILL_KEY``: where a crash between
two steps of a protocol (a commit, a compaction's swap) leaves the store.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from fanout.backends.local.store import DirStore
from fanout.cli import main

_OP = os.environ.get("FANOUT_TEST_KILL_OP", "")
_KEY = os.environ.get("FANOUT_TEST_KILL_KEY", "")
_NTH = int(os.environ.get("FANOUT_TEST_KILL_NTH", "1"))
_seen = 0


def _after(op: str, key: str) -> None:
    global _seen
    if op == _OP and _KEY and _KEY in key:
        _seen += 1
        if _seen == _NTH:
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(op: str) -> Any:
    real = getattr(DirStore, op)

    def wrapped(self: DirStore, key: str, *args: Any, **kwargs: Any) -> Any:
        result = real(self, key, *args, **kwargs)
        _after(op, key)
        return result

    return wrapped


DirStore.put = _wrap("put")  # type: ignore[method-assign]
DirStore.delete = _wrap("delete")  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
