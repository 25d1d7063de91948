"""fanout: long jobs split into checkpointed chunks under a time budget,
written as Avro, run locally or on AWS.

The job API (``from fanout import Job, ChunkContext, ...``) is imported when a
name is first used (PEP 562), not with the package: ``import fanout.aws_lambda``
or ``python -m fanout.cli`` imports ``fanout`` first, and neither should pay
for modules (pydantic, through :class:`RunSettings`) it does not use
(``tests/test_coldstart.py``).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see: the names, eagerly
    from fanout.batching import batched
    from fanout.context import ChunkContext, Continue
    from fanout.errors import PermanentError, RecordError, UserError
    from fanout.jobs import Job
    from fanout.settings import RunSettings

__all__ = [
    "ChunkContext",
    "Continue",
    "Job",
    "PermanentError",
    "RecordError",
    "RunSettings",
    "UserError",
    "batched",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Plain imports (not importlib): tests/test_layers.py reads them.
    module: ModuleType
    if name in ("ChunkContext", "Continue"):
        from fanout import context

        module = context
    elif name in ("PermanentError", "RecordError", "UserError"):
        from fanout import errors

        module = errors
    elif name == "Job":
        from fanout import jobs

        module = jobs
    elif name == "RunSettings":
        from fanout import settings

        module = settings
    elif name == "batched":
        from fanout import batching

        module = batching
    else:
        raise AttributeError(f"module 'fanout' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # once: later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
