"""The message envelope: validated on receipt, large payloads through the store."""

from __future__ import annotations

import json

import pytest

from fanout.backends.base import Backend
from fanout.messages import ChunkMessage, MessageError, decode, encode, offload, resolve


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
    body = offload(msg, mem.store, limit=1000)
    assert len(body) < 1000
    slim = decode(body)
    assert slim.payload is None and slim.payload_ref == "runs/r/payloads/0.1-s0.json"
    assert resolve(slim, mem.store) == ({"blob": "x" * 5000}, [1, 2])
    # Small messages travel as they are.
    assert json.loads(offload(msg, mem.store, limit=10_000))["payload"] == {"blob": "x" * 5000}


def test_a_reference_outside_its_run_is_refused(mem: Backend) -> None:
    mem.store.put("runs/other/payloads/x.json", b'{"payload": 1}')
    forged = ChunkMessage(run_id="r", chunk_id="0", payload_ref="runs/other/payloads/x.json")
    with pytest.raises(MessageError, match="outside"):
        resolve(forged, mem.store)
