"""One Lambda invocation in its own process, for tests/support/lambda_source.py:
``python lambda_invoke.py EVENT.json TIMEOUT_MS [--hang-on-output]``.

With ``--hang-on-output`` the first Avro output the chunk writes never finishes
(a stuck upload), so the invocation runs into its timeout and is killed by the
test, the way Lambda kills an invocation that overruns.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from support.lambda_source import Countdown


def _hang_on_output() -> None:
    from fanout.backends.aws.store import S3Store

    put = S3Store.put

    def stuck(self: S3Store, key: str, data: Any, *, if_absent: bool = False) -> bool:
        if key.endswith(".avro"):
            print(f"lambda_invoke: stuck writing {key}", file=sys.stderr, flush=True)
            time.sleep(3600)
        return put(self, key, data, if_absent=if_absent)

    S3Store.put = stuck  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    event = json.loads(Path(argv[0]).read_text())
    if "--hang-on-output" in argv:
        _hang_on_output()
    import fanout.aws_lambda as lambda_mod

    # Lambda's function timeout counts from the invocation, not from the
    # process's start and imports (its init phase): the test's reaper reads this.
    Path(argv[0]).with_suffix(".started").write_text(repr(time.time()))
    response = lambda_mod.handler(event, Countdown(int(argv[1])))
    print(json.dumps(response))


if __name__ == "__main__":
    main(sys.argv[1:])
