"""Strict checks of JSON fields, for the message envelopes (``fanout.messages``):
exact JSON types, full-match patterns, bounded nesting, no lone surrogate, and
errors in pydantic's words (the envelopes once were pydantic models, and their
errors read the same). Imports nothing of fanout's."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, Final

#: Containers nested deeper than this (the envelope's own object counts) are
#: refused, as pydantic's JSON parser refused them.
MAX_DEPTH = 200


class FieldError(Exception):
    """The first bad field of an envelope: where (dotted) and what, in pydantic's words."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")


# -- checks shared by the envelopes ----------------------------------------------------


def is_int(value: object) -> bool:
    """Whether ``value`` is a JSON integer (not a bool, not a float)."""
    return type(value) is int  # not bool, not float: the strict type


def check_extra(fields: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Refuse the first key of ``fields`` that is not ``allowed``."""
    # pydantic reported keys that are not fields before any field's own error.
    for key in fields:
        if key not in allowed:
            raise FieldError(str(key), "Extra inputs are not permitted")


def check_string(where: str, value: object, pattern: str, match: Any) -> str:
    """``value``, if it is a string that ``match`` (a compiled pattern's
    ``fullmatch``) accepts; else :class:`FieldError` at ``where``."""
    if not isinstance(value, str):
        raise FieldError(where, "Input should be a valid string")
    if match(value) is None:
        raise FieldError(where, f"String should match pattern '{pattern}'")
    return value


def json_problem(value: object, where: str, depth: int, typed: bool) -> FieldError | None:
    """Why ``value`` is not a JSON value fit for an envelope (None if it is):
    containers nested deeper than :data:`MAX_DEPTH` in all (``depth`` is that
    of ``value``'s parent), a lone surrogate in a string or key, and when
    ``typed`` (values built in Python, not parsed from JSON) a type JSON has
    not (a tuple, a set, bytes, a non-string key). Iterative: any depth."""
    stack: list[tuple[object, str, int]] = [(value, where, depth)]
    while stack:
        item, path, level = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    # Parsed from JSON, it is the body that is at fault (a "\\ud800" escape).
                    where = path if typed else "message"
                    return FieldError(where, "Invalid JSON: lone surrogate in a string")
        elif isinstance(item, dict | list):
            if level + 1 > MAX_DEPTH:
                return FieldError("message", "Invalid JSON: recursion limit exceeded")
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        return FieldError(f"{path}.[key]", "Input should be a valid string")
                    stack.append((key, f"{path}.[key]", level + 1))
                    stack.append((sub, f"{path}.{key}", level + 1))
            else:
                stack.extend((sub, f"{path}.{i}", level + 1) for i, sub in enumerate(item))
        elif typed and not (item is None or isinstance(item, bool | int | float)):
            return FieldError(path, "input was not a valid JSON value")
    return None


#: JSON's whitespace, which may stand around a body's value.
WHITESPACE: Final = " \t\n\r"
DECODER: Final = json.JSONDecoder()


def json_ok(value: object, typed: bool) -> bool:
    """:func:`json_problem` is None for ``value`` (a payload or cursor), in a
    quicker walk that builds no paths: the constructor's common case."""
    stack = [(value, 2)]  # the envelope's object is depth 1
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
            for key in item:
                if not isinstance(key, str) or (not key.isascii() and not utf8(key)):
                    return False
        elif isinstance(item, list):
            children = item
        else:
            children = (item,)
            level = 1  # a scalar, checked as a container's child below
        if level > MAX_DEPTH:
            return False
        for sub in children:
            if isinstance(sub, str):
                if not sub.isascii() and not utf8(sub):
                    return False
            elif isinstance(sub, dict | list):
                stack.append((sub, level + 1))
            elif typed and not (sub is None or isinstance(sub, bool | int | float)):
                return False
    return True


def utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (has no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def parse_object(body: str) -> dict[str, Any]:
    """``body`` as a JSON object; :class:`FieldError` at ``message`` if it is not
    one. ``json.loads`` itself, less its two regular-expression scans for
    whitespace (a third of its time on a message's body)."""
    if not body.isascii() and not utf8(body):  # a lone surrogate, not escaped
        raise FieldError("message", "Invalid JSON: lone surrogate")
    start = 0 if body[:1] == "{" else len(body) - len(body.lstrip(WHITESPACE))
    try:
        obj, end = DECODER.raw_decode(body, start)
        if end != len(body) and body[end:].strip(WHITESPACE):
            raise json.JSONDecodeError("Extra data", body, end)
    except RecursionError:
        raise FieldError("message", "Invalid JSON: recursion limit exceeded") from None
    except ValueError as exc:  # JSONDecodeError, or an integer over 4300 digits
        raise FieldError("message", f"Invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FieldError("message", "Input should be an object")
    return obj


def params_problem(params: Mapping[str, Any]) -> str | None:
    """Why a run's ``params`` cannot travel as a chunk's payload (None if they
    can), checked at submit, where the user can still fix them (see
    :func:`value_problem`)."""
    return value_problem(params, "params")


def value_problem(value: object, where: str) -> str | None:
    """Why ``value`` cannot be a message's payload or cursor (None if it can),
    named ``where``: not JSON (a set, bytes, a key that is not a string),
    nested deeper than a message may be, a lone surrogate, NaN or an infinity
    (not JSON), or an integer too long for Python to write out as text."""
    problem = json_problem(value, where, 1, typed=True)
    if problem is not None:
        text = str(problem)
        if text.startswith("message:"):  # the one error json_problem places there
            return f"{where} is nested too deep (at most {MAX_DEPTH - 2} levels)"
        if text.endswith(".[key]: Input should be a valid string"):
            return f"{text.split('.[key]:')[0]} has a key that is not a string"
        return text
    stack: list[tuple[object, str]] = [(value, where)]
    while stack:  # the depth is bounded now: json_problem checked it
        item, path = stack.pop()
        if isinstance(item, dict):
            stack.extend((sub, f"{path}.{key}") for key, sub in item.items())
        elif isinstance(item, list):
            stack.extend((sub, f"{path}.{i}") for i, sub in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{path}: {item} is not JSON (NaN and infinities are not numbers there)"
        elif type(item) is int:
            try:
                str(item)
            except ValueError:  # past sys.get_int_max_str_digits()
                limit = sys.get_int_max_str_digits()
                return f"{path}: an integer of more than {limit} digits"
    return None


#: What ``ensure_ascii=False`` leaves raw but SQS refuses in a body (it takes
#: only #x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD #x10000-#x10FFFF; JSON escapes the
#: controls itself): U+FFFE, U+FFFF and lone surrogates. Sent raw, the send
#: failed and the run waited forever on a child that never went out.
_SQS_REFUSED: Final = re.compile("[\ud800-\udfff\ufffe\uffff]")


def sqs_safe(text: str) -> str:
    """The JSON ``text`` with the characters SQS refuses written as ``\\uXXXX``
    escapes: the same JSON value. Such a character can only be inside a JSON
    string (JSON's whitespace is ASCII), where its escape means the same."""
    if text.isascii() or _SQS_REFUSED.search(text) is None:
        return text
    return _SQS_REFUSED.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def storable(text: str) -> str:
    """``text``, with any lone surrogate written as its escape (``\\udcff``).
    Python makes them of bytes that are not UTF-8 (a file name, an argument),
    and an exception carries them into its message: written as they were, the
    ledger's write of the failure raised UnicodeEncodeError (SQLite, DynamoDB
    alike), the attempt was recorded as crashed only when its lease ran out,
    and its error was lost."""
    if utf8(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
