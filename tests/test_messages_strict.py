"""The envelopes checked by hand (issue 11) are as strict as the pydantic models
they replaced: a corpus of bodies, valid and forged, is decoded both ways. A
body the old models refused is refused, naming the same field with the same
words; a body they accepted is accepted with the same fields, except the lax
coercions listed in :data:`STRICTER` (``"5"`` or ``true`` for an integer),
which fanout never sends and the hand-written checks refuse."""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from typing import Annotated, Any, Literal

import pytest
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
)

from fanout.messages import (
    CHUNK_ID_PATTERN,
    MAX_SEQ,
    RUN_ID_PATTERN,
    ChunkMessage,
    MessageError,
    ScheduleFire,
    Sweep,
    decode,
    decode_envelope,
    encode,
)

# -- the reference: the pydantic models of fanout/messages.py before issue 11 ---------


class OldChunkMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    run_id: str = Field(pattern=RUN_ID_PATTERN)
    chunk_id: str = Field(pattern=CHUNK_ID_PATTERN)
    seq: int = Field(default=0, ge=0, le=MAX_SEQ)
    kind: Literal["plan", "process"] = "process"
    payload: JsonValue = None
    payload_ref: str | None = Field(default=None, max_length=1024)
    cursor: JsonValue = None


class OldScheduleFire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    kind: Literal["schedule.fire"] = "schedule.fire"
    schedule: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    scheduled_time: AwareDatetime
    definition: dict[str, JsonValue] | None = None


class OldSweep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1]
    kind: Literal["fanout.sweep"]


OLD_ENVELOPE: TypeAdapter[Any] = TypeAdapter(
    Annotated[OldChunkMessage | OldScheduleFire | OldSweep, Field(union_mode="left_to_right")]
)


def old_decode(body: str) -> tuple[str, Any]:
    """("ok", fields) or ("error", ["field: words", ...]) as the old models
    decoded ``body``: every error of the model that claimed it, since which one
    pydantic lists first changed between its releases (2.14 puts a field's
    error before an extra key's)."""
    try:
        return "ok", OLD_ENVELOPE.validate_json(body).model_dump(mode="json")
    except ValidationError as exc:
        errors = exc.errors()
        by_member: dict[Any, list[Any]] = {}
        for err in errors:
            by_member.setdefault(err["loc"][0] if err["loc"] else None, []).append(err)
        claimed = next(
            (
                errs
                for member, errs in by_member.items()
                if member is not None and not any(e["loc"][1:] == ("kind",) for e in errs)
            ),
            by_member.get("OldChunkMessage") or errors,
        )
        return "error", [
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'message'}: {err['msg']}"
            for err in claimed
        ]


def new_decode(body: str) -> tuple[str, Any]:
    try:
        message = decode_envelope(body)
    except MessageError as exc:
        return "error", str(exc).removeprefix("invalid message: ")
    if isinstance(message, Sweep):
        return "ok", {"v": message.v, "kind": message.kind}
    if isinstance(message, ScheduleFire):
        return "ok", json.loads(message.model_dump_json())
    assert isinstance(message, ChunkMessage)
    return "ok", json.loads(encode(message))


# -- the corpus -------------------------------------------------------------------------

GOOD: dict[str, Any] = {"v": 1, "run_id": "r-1", "chunk_id": "0/2", "seq": 3, "kind": "process"}

#: Values tried for each field: valid ones, wrong types, off by one, forged.
# fmt: off
VALUES: dict[str, list[Any]] = {
    "v": [1, 0, 2, "1", None, 1.5, [1], {}],
    "run_id": ["r", "R.r_r-9", "a" * 128, "a" * 129, "", "-r", "../r", "r/x", "r\n", "é", 5,
               None, ["r"], "r x", "r\u0000"],
    "chunk_id": ["0", "0/1/2", "123456789", "1234567890", "0/" * 63 + "0", "0/" * 64 + "0",
                 "", "/0", "0/", "0/../x", "٣", "0\n", 0, None, "a"],
    "seq": [0, 1, MAX_SEQ, MAX_SEQ + 1, -1, 2**70, -(2**70), None, "x", 1.5, [0], {}],
    "kind": ["plan", "process", "exec", "", None, 1, ["plan"], "schedule.fire", "PLAN"],
    "payload": [None, 1, -0.5, "x", "é😀", True, [1, "x", None], {"a": {"b": [1]}}, {"": 1},
                [[[[]]]], 1e308],
    "payload_ref": [None, "runs/r/payloads/0.json", "", "a" * 1024, "a" * 1025, 5, ["x"], {}],
    "cursor": [None, 7, {"line": 1000}, ["a", 1], "c"],
}
# fmt: on

#: Bodies the old models accepted by coercion and the new checks refuse: these
#: integer fields holding a string, a boolean or a float.
STRICTER = {"v": ["true", "1.0"], "seq": ['"5"', "true", "3.0", "1e3", '" 5 "', '"0\\n"']}


def coerced(fields: dict[str, Any]) -> bool:
    """Whether an integer field of ``fields`` holds what only a lax check takes."""
    return any(type(fields.get(name, 0)) in (str, bool, float) for name in STRICTER)


def same_error(old: str, new: str) -> bool:
    """The same field, in the same words. pydantic's may go on to say which
    coercion it tried ("..., unable to parse string as an integer"), and each
    JSON parser words its own syntax errors."""
    (old_field, old_words), (new_field, new_words) = old.split(": ", 1), new.split(": ", 1)
    if old_field != new_field:
        return False
    if old_words.startswith("Invalid JSON") or "parse" in old_words:
        return new_words.split(":")[0] == old_words.split(":")[0] or "integer" in new_words
    return old_words.startswith(new_words)


def bodies() -> list[str]:
    out = []
    for field, values in VALUES.items():
        for value in values:
            out.append(json.dumps({**GOOD, field: value}))
    for field in GOOD:  # each field missing
        out.append(json.dumps({k: v for k, v in GOOD.items() if k != field}))
    for a, b in itertools.combinations(["v", "run_id", "chunk_id", "seq", "kind"], 2):
        bad = {"v": 2, "run_id": "../r", "chunk_id": "x", "seq": -1, "kind": "exec"}
        out.append(json.dumps({**GOOD, a: bad[a], b: bad[b]}))  # the first of two named
        out.append(json.dumps({k: v for k, v in GOOD.items() if k not in (a, b)}))
    out += [
        json.dumps({**GOOD, "pickle": "gASV"}),
        json.dumps({"zz": 1, **GOOD, "aa": 2, "seq": -1}),
        json.dumps({"x": 1}),
        json.dumps({"v": 1, "kind": "fanout.sweep"}),
        json.dumps({"kind": "fanout.sweep", "v": 1}),
        json.dumps({"v": 1, "kind": "fanout.sweep", "extra": 1}),
        json.dumps({"kind": "fanout.sweep"}),
        json.dumps({"v": 1}),
        json.dumps({"v": 2, "kind": "fanout.sweep"}),
        json.dumps({"v": 1, "kind": "fanout.sweep", "run_id": "r", "chunk_id": "0"}),
        json.dumps({"v": 1, "kind": "nonsense"}),
        json.dumps({"v": 1, "kind": "schedule.fire", "schedule": "p", "scheduled_time": "x"}),
        json.dumps({"kind": "schedule.fire", "schedule": "p", "scheduled_time": "2030-01-01Z"}),
        json.dumps({"kind": "schedule.fire", "schedule": "p", "scheduled_time": 1e9}),
        "{", "", "null", "[]", '"text"', "1", "{} x", ' {"run_id":"r","chunk_id":"0"} ',
        '{"run_id":"r","chunk_id":"0","kind":"plan","kind":"process"}',
        '{"run_id":"r","chunk_id":"0","payload":NaN,"cursor":-Infinity}',
        '{"run_id":"r","chunk_id":"0","payload":"\\ud83d\\ude00"}',
        '{"run_id":"r","chunk_id":"0","payload":"\\ud800"}',
        '{"run_id":"r","chunk_id":"0","payload":{"\\udc00":1}}',
        '{"run_id":"r","chunk_id":"0","payload":"\\\\ud800"}',
        '{"run_id":"r","chunk_id":"0","payload":1e400}',
        '{"run_id":"r","chunk_id":"0","seq":1e300}',
        '{"run_id":"r","chunk_id":"0","payload":' + "9" * 5000 + "}",
        "[" * 60_000 + "]" * 60_000,
    ]  # fmt: skip
    head = '{"run_id":"r","chunk_id":"0",'
    for depth in (150, 199, 200):  # nesting around the limit (the envelope counts)
        out.append(head + '"payload":' + '{"a":' * depth + "1" + "}" * depth + "}")
        out.append(head + '"cursor":' + "[1," * depth + "1" + "]" * depth + "}")
    rng = random.Random(11)
    pool = [v for values in VALUES.values() for v in values]
    for _ in range(300):  # random mixes: several fields bad at once, extras, missing ones
        fields = dict(GOOD)
        for name in rng.sample(sorted(VALUES), rng.randint(1, 4)):
            fields[name] = rng.choice(pool if rng.random() < 0.3 else VALUES[name])
        for name in rng.sample(sorted(GOOD), rng.randint(0, 2)):
            fields.pop(name, None)
        if rng.random() < 0.2:
            fields[rng.choice(["extra", "Run_id", "payloadref"])] = 1
        keys = list(fields)
        rng.shuffle(keys)
        out.append(json.dumps({k: fields[k] for k in keys}))
    return out


def test_the_hand_written_checks_decide_every_body_as_the_old_models_did() -> None:
    corpus = bodies()
    assert len(corpus) > 400
    compared = refused = 0
    for body in corpus:
        old, new = old_decode(body), new_decode(body)
        if old[0] == new[0] == "error":
            # The hand-written checks name one of the problems the model found.
            assert any(same_error(problem, new[1]) for problem in old[1]), (body[:200], old, new)
        elif old[0] == new[0] == "ok":  # the same fields (NaN too: compared as JSON)
            assert json.dumps(old[1], sort_keys=True) == json.dumps(new[1], sort_keys=True)
        else:  # only the lax coercions may differ, and only as a refusal
            assert old[0] == "ok" and coerced(json.loads(body)), (body[:200], old, new)
        compared += 1
        refused += new[0] == "error"
    assert refused > 200 and compared - refused > 20  # both kinds were well represented


@pytest.mark.parametrize(("field", "texts"), sorted(STRICTER.items()))
def test_lax_coercions_are_refused_naming_the_field(field: str, texts: list[str]) -> None:
    for text in texts:
        body = '{"run_id":"r","chunk_id":"0","' + field + '":' + text + "}"
        assert old_decode(body)[0] == "ok"  # pydantic coerced it
        with pytest.raises(MessageError, match=f"^invalid message: {field}: Input should be"):
            decode(body)


def test_messages_built_in_python_are_checked_and_round_trip() -> None:
    built = ChunkMessage(run_id="r-1", chunk_id="0/2", seq=3, payload={"é": [1.5, None]}, cursor=1)
    assert decode(encode(built)) == built
    # A message whose chunk spawned nothing yet is encoded as before `spawned`
    # was a field (an older fanout reads it); one that did carries the count.
    fields = {k: v for k, v in built.to_dict().items() if k != "spawned"}
    assert json.loads(encode(built)) == OldChunkMessage(**fields).model_dump()
    counted = built.model_copy(update={"spawned": 7})
    assert decode(encode(counted)) == counted and json.loads(encode(counted))["spawned"] == 7
    for bad, where in [
        ({"payload": (1, 2)}, "payload"),
        ({"payload": {"a": {1, 2}}}, "payload.a"),
        ({"payload": {1: "x"}}, "payload.[key]"),
        ({"cursor": b"x"}, "cursor"),
        ({"payload": "\ud800"}, "payload"),
        ({"seq": True}, "seq"),
        ({"run_id": "r\n"}, "run_id"),
        ({"kind": "exec"}, "kind"),
        ({"spawned": -1}, "spawned"),
        ({"spawned": True}, "spawned"),
        ({"spawned": False}, "spawned"),  # (== 0: the fast check took it)
        ({"spawned": 0.0}, "spawned"),
    ]:
        with pytest.raises(MessageError, match=f"^invalid message: {re.escape(where)}: "):
            ChunkMessage(**{"run_id": "r", "chunk_id": "0", **bad})
    with pytest.raises(AttributeError):
        built.seq = 4  # type: ignore[misc]
    assert built != tuple(built) and tuple(built) != built  # compared with messages only
    assert copy.deepcopy(built) == built and copy.deepcopy(built).payload is not built.payload
    slim = built.model_copy(update={"payload": None, "payload_ref": "runs/r-1/payloads/x"})
    assert (slim.payload, slim.payload_ref, slim.seq, built.payload) == (
        None, "runs/r-1/payloads/x", 3, {"é": [1.5, None]}
    )  # fmt: skip
    with pytest.raises(MessageError, match="seq"):
        built.model_copy(update={"seq": -1})
