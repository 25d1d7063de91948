"""A job without a plan whose params, spawned payloads and cursors hold
characters SQS refuses in a message body (U+FFFE, U+FFFF): the root chunk
(payload: the params) spawns a child, which continues once; every chunk emits
the text it was given."""

from __future__ import annotations

from typing import Any

from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "odd",
    "namespace": "tests",
    "fields": [{"name": "text", "type": "string"}],
}

job = Job("odd_chars", schema=SCHEMA)


@job.process
def process(chunk: dict[str, Any], ctx: Any) -> Any:
    if ctx.cursor is not None:
        ctx.emit({"text": ctx.cursor})
        return None
    ctx.emit({"text": chunk["text"]})
    if "child" not in chunk:
        ctx.spawn({"text": chunk["text"] + "\uffff", "child": True})
        return None
    return ctx.resume_at(chunk["text"] + "\ufffe")
