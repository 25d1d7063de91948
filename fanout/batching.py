"""Batching a plan's inputs into chunks of a useful size: ``fanout.batched``.

A plan over a million small inputs should not make a million chunks (each
costs a message, a claim and a commit, and ``max_chunks`` stops the run at
100,000): ``yield from fanout.batched(items, max_items=1000)`` makes each
chunk's payload a list of up to 1,000 of them, and ``max_bytes`` bounds a
batch's size as compact JSON, so payloads stay under the queue's message
limit (256 KiB on SQS) instead of travelling through the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from fanout.errors import PermanentError


def _size(item: Any) -> int:
    try:
        return len(json.dumps(item, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"batched: an item must be JSON (no pickle): {exc}") from None


def batched(
    items: Iterable[Any], max_items: int | None = None, max_bytes: int | None = None
) -> Iterator[list[Any]]:
    """Group ``items`` (lazily, in order) into lists of at most ``max_items``
    items whose compact JSON is at most ``max_bytes`` bytes. An item too large
    for a batch of its own raises :class:`fanout.PermanentError` naming it: at
    plan time, the run fails at once instead of queueing it."""
    if max_items is None and max_bytes is None:
        raise ValueError("batched: give max_items, max_bytes or both")
    if max_items is not None and max_items < 1:
        raise ValueError(f"batched: max_items must be at least 1, not {max_items}")
    if max_bytes is not None and max_bytes < 3:
        raise ValueError(f"batched: max_bytes must be at least 3, not {max_bytes}")
    batch: list[Any] = []
    size = 2  # "[]"
    for index, item in enumerate(items):
        item_size = _size(item) if max_bytes is not None else 0
        if max_bytes is not None and item_size + 2 > max_bytes:
            raise PermanentError(
                f"batched: item {index} is {item_size:,} bytes as JSON, over max_bytes"
                f" ({max_bytes:,}) even alone: split it, or raise max_bytes"
            )
        grown = size + item_size + (1 if batch else 0)
        full = max_items is not None and len(batch) >= max_items
        if batch and (full or (max_bytes is not None and grown > max_bytes)):
            yield batch
            batch, grown = [], 2 + item_size
        batch.append(item)
        size = grown
    if batch:
        yield batch
