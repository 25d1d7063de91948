"""What a chunk asks for when it commits: the tasks of its spawned children
(``ctx.spawn``) and of its continuation (``ctx.resume_at``), with deterministic
ids, or the runaway bound (``max_depth``, ``max_continuations``) they would
break. Registered by the runner before its commit (docs/architecture.md,
"The commit order"). Also what a plan function's result may be."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fanout.backends.base import NewTask, Store
from fanout.backends.rules import JOB_STOP_PREFIX
from fanout.context import Continue, Spawn
from fanout.errors import PermanentError
from fanout.limits import RunLimits
from fanout.messages import ChunkMessage, MessageError, encode_child, offload


def next_tasks(
    msg: ChunkMessage,
    payload: Any,
    spawned: Sequence[Spawn],
    continuation: Continue | None,
    settings: RunLimits,
    store: Store,
    limit: int,
    token: str,
    stop: str | None = None,
) -> tuple[list[tuple[NewTask, float]], str | None]:
    """The tasks the chunk ``msg`` asks for, each with its queue delay (s), or
    why the run stops: the runaway bound they would break, or the job's own
    ``ctx.stop_run``. ``payload`` is the chunk's own (its
    continuation carries it on); bodies over ``limit`` bytes are offloaded to
    ``store``, under keys of the attempt ``token`` (``messages.offload``)."""
    if stop is not None:
        return [], JOB_STOP_PREFIX + stop
    tasks: list[tuple[NewTask, float]] = []
    if spawned:
        depth = msg.depth + 1
        if depth > settings.max_depth:
            return [], f"max_depth ({settings.max_depth}) reached at chunk {msg.chunk_id}"
        for i, spawn in enumerate(spawned, msg.spawned):
            # The i-th child of chunk "0/3" is "0/3/i", counted over its slices
            # (a continuation carries on the count): a re-run of this slice
            # registers the same ids, so nothing is created twice; and a later
            # slice's children are new ones (numbered from 0 in each slice,
            # they were taken for the first slice's, and dropped).
            chunk_id = f"{msg.chunk_id}/{i}"
            try:
                body = encode_child(msg.run_id, chunk_id, spawn.payload, spawn.text)
            except MessageError as exc:
                # The job's payload (say a dict with int keys, which JSON would
                # turn into strings): the job's fault, failed for good, not retried.
                raise PermanentError(
                    f"ctx.spawn in chunk {msg.chunk_id}: the payload is not JSON"
                    f" a message can carry: {exc}"
                ) from None
            if (len(body) if body.isascii() else len(body.encode())) > limit:
                child = ChunkMessage(run_id=msg.run_id, chunk_id=chunk_id, payload=spawn.payload)
                body = offload(child, store, limit, token)
            not_before = time.time() + spawn.delay if spawn.delay else 0.0
            task = NewTask(chunk_id, 0, depth, body, msg.chunk_id, msg.seq, not_before)
            tasks.append((task, spawn.delay))
    if continuation is not None:
        if msg.seq + 1 > settings.max_continuations:
            return [], (
                f"max_continuations ({settings.max_continuations}) reached at chunk {msg.chunk_id}"
            )
        try:
            nxt = ChunkMessage(
                run_id=msg.run_id,
                chunk_id=msg.chunk_id,
                seq=msg.seq + 1,
                kind=msg.kind,
                payload=payload,
                cursor=continuation.cursor,
                spawned=msg.spawned + len(spawned),
            )
        except MessageError as exc:
            # ctx.resume_at checked the cursor; a Continue built by hand was not.
            raise PermanentError(
                f"ctx.resume_at in chunk {msg.chunk_id}: the cursor is not JSON"
                f" a message can carry: {exc}"
            ) from None
        body = offload(nxt, store, limit, token)
        tasks.append((NewTask(nxt.chunk_id, nxt.seq, msg.depth, body, msg.chunk_id, msg.seq), 0.0))
    return tasks, None


def plan_payloads(result: Any) -> Iterable[Any]:
    """What a plan function returned, as the payloads of the run's first chunks.

    A plan yields (or returns a list of) payloads; ``None`` means it spawned
    through ``ctx.spawn`` itself. A dict, a string or bytes is refused: iterating
    it would quietly make one chunk per key or per character.

    Raises:
        PermanentError: ``result`` is not an iterable of payloads.
    """
    if result is None:
        return ()
    if isinstance(result, (str, bytes, bytearray, Mapping)):
        raise PermanentError(
            f"the plan returned a {type(result).__name__} value, not an iterable of chunk payloads;"
            " yield each payload, or return a list of them"
        )
    try:
        payloads: Iterable[Any] = iter(result)
    except TypeError:
        raise PermanentError(
            f"the plan returned a {type(result).__name__} value, not an iterable of chunk payloads"
        ) from None
    return payloads
