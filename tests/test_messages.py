"""The message envelope: validated on receipt, large payloads through the store."""

from __future__ import annotations

import json

import pytest

from fanout.backends.base import Backend
from fanout.json_fields import MAX_DEPTH
from fanout.messages import (
    ChunkMessage,
    MessageError,
    decode,
    encode,
    encode_child,
    offload,
    resolve,
)


def test_round_trip() -> None:
    msg = ChunkMessage(run_id="r-1", chunk_id="0/2/5", seq=3, payload={"a": [1, "x"]}, cursor=7)
    assert decode(encode(msg)) == msg
    assert msg.depth == 2


@pytest.mark.parametrize(
    "body, where",
    [
        ("{", "message"),
        ('{"v": 2, "run_id": "r", "chunk_id": "0"}', "v"),
        ('{"v": 1, "run_id": "r", "chunk_id": "0/../x"}', "chunk_id"),
        ('{"v": 1, "run_id": "../r", "chunk_id": "0"}', "run_id"),
        ('{"v": 1, "run_id": "r", "chunk_id": "0", "seq": -1}', "seq"),
        ('{"v": 1, "run_id": "r", "chunk_id": "0", "pickle": "gASV"}', "pickle"),
        ('{"v": 1, "run_id": "r", "chunk_id": "0", "kind": "exec"}', "kind"),
    ],
)
def test_invalid_envelopes_are_rejected_naming_the_field(body: str, where: str) -> None:
    with pytest.raises(MessageError, match=where):
        decode(body)


def test_large_payload_is_offloaded_and_resolved(mem: Backend) -> None:
    msg = ChunkMessage(run_id="r", chunk_id="0/1", payload={"blob": "x" * 5000}, cursor=[1, 2])
    body = offload(msg, mem.store, limit=1000, token="abcdef0123")
    assert len(body) < 1000
    slim = decode(body)
    assert slim.payload is None and slim.payload_ref == "runs/r/payloads/0.1-s0-abcdef01.json"
    assert resolve(slim, mem.store) == ({"blob": "x" * 5000}, [1, 2])
    # Small messages travel as they are.
    assert json.loads(offload(msg, mem.store, limit=10_000, token="t"))["payload"] == {
        "blob": "x" * 5000
    }


def test_a_reference_outside_its_run_is_refused(mem: Backend) -> None:
    mem.store.put("runs/other/payloads/x.json", b'{"payload": 1}')
    forged = ChunkMessage(run_id="r", chunk_id="0", payload_ref="runs/other/payloads/x.json")
    with pytest.raises(MessageError, match="outside"):
        resolve(forged, mem.store)


def _too_deep() -> list[object]:
    nested: list[object] = [0]
    for _ in range(MAX_DEPTH):
        nested = [nested]
    return nested


_SPAWNED = [
    None,
    7,
    -2.5e-300,
    "zoë ✓",
    {"path": "s3://b/k.csv", "n": [1, 2.0, None, True], "deep": {"x": {"y": []}}},
    [{"ü": "\u2028"}, 10**30],
]


@pytest.mark.parametrize("payload", _SPAWNED)
def test_a_spawned_childs_body_is_the_message_the_constructor_would_encode(payload: object) -> None:
    # ctx.spawn encodes the payload once; the child's body is built from that text.
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    body = encode_child("r-1", "0/4", payload, text)
    msg = ChunkMessage(run_id="r-1", chunk_id="0/4", payload=payload)
    assert body == encode(msg)
    assert decode(body) == msg


@pytest.mark.parametrize(
    "payload",
    [
        (1, 2),
        {1: "int key"},
        "lone \ud800 surrogate",
        _too_deep(),
    ],
)
def test_a_spawned_payload_the_constructor_refuses_is_refused(payload: object) -> None:
    with pytest.raises(MessageError):
        ChunkMessage(run_id="r-1", chunk_id="0/4", payload=payload)
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(MessageError):
        encode_child("r-1", "0/4", payload, text)
