"""fanout: long jobs split into checkpointed chunks under a time budget,
written as Avro, run locally or on AWS."""

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
