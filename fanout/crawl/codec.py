"""Scrapy requests and items as JSON, never pickle.

A pending request crosses a chunk boundary inside a queue message, so it must
survive as data: URL, method, headers, body, cookies, callback and errback by
name, ``cb_kwargs``, ``meta`` (depth, retry counts and the user's own keys),
priority, ``dont_filter`` and flags. Values JSON has no type for (bytes,
datetimes, decimals, tuples) travel tagged, as ``{"$bytes": "<base64>"}`` and
the like. Request classes are limited to Scrapy's own: a message is untrusted
input, and loading a class named by it would import arbitrary code.
"""

from __future__ import annotations

import base64
import datetime as dt
from decimal import Decimal
from typing import Any

from scrapy import Request, Spider

#: Request classes a message may name (anything else is refused).
REQUEST_CLASSES = {
    "scrapy.http.request.Request": "scrapy.http.Request",
    "scrapy.http.request.form.FormRequest": "scrapy.http.FormRequest",
    "scrapy.http.request.json_request.JsonRequest": "scrapy.http.JsonRequest",
}


class CodecError(ValueError):
    """A value that cannot travel as JSON, or a request dict that is not acceptable."""


def encode_value(value: Any, where: str = "value") -> Any:
    """``value`` as JSON-able data, with tags for bytes, datetimes, decimals, tuples."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f"{where}: key {k!r} is not a string")
            out[k] = encode_value(v, f"{where}.{k}")
        # A user dict that looks like a tag is escaped, so it decodes to itself.
        return {"$dict": out} if len(out) == 1 and next(iter(out)).startswith("$") else out
    if isinstance(value, list):
        return [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    raise CodecError(f"{where}: {type(value).__name__} cannot travel as JSON (no pickle)")


def decode_value(value: Any) -> Any:
    """The inverse of :func:`encode_value`."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        tag, inner = next(iter(value.items()))
        if tag == "$bytes":
            return base64.b64decode(inner)
        if tag == "$datetime":
            return dt.datetime.fromisoformat(inner)
        if tag == "$date":
            return dt.date.fromisoformat(inner)
        if tag == "$decimal":
            return Decimal(inner)
        if tag == "$tuple":
            return tuple(decode_value(v) for v in inner)
        if tag == "$dict":
            return {k: decode_value(v) for k, v in inner.items()}
    return {k: decode_value(v) for k, v in value.items()}


def request_to_json(request: Request, spider: Spider) -> dict[str, Any]:
    """A request as JSON-able data; :class:`CodecError` names what cannot travel."""
    d = request.to_dict(spider=spider)
    cls = d.pop("_class", "scrapy.http.request.Request")
    if cls not in REQUEST_CLASSES:
        raise CodecError(f"request {request.url}: class {cls} cannot cross a chunk boundary")
    d["headers"] = {
        k.decode("latin-1"): [v.decode("latin-1") for v in vs] for k, vs in d["headers"].items()
    }
    out = encode_value(d, f"request {request.url}")
    if cls != "scrapy.http.request.Request":
        out["_class"] = cls
    return dict(out)


def check_keepable(request: Request, spider: Spider) -> None:
    """Raise :class:`CodecError` naming what of ``request`` cannot cross a chunk
    boundary. The cheap part of :func:`request_to_json`, for every request a
    chunk schedules: a callback that is the spider's method of the same name,
    and meta, ``cb_kwargs`` and cookies JSON can carry (its tags included)."""
    where = f"request {request.url}"
    cls = f"{type(request).__module__}.{type(request).__name__}"
    if cls not in REQUEST_CLASSES:
        raise CodecError(f"{where}: class {cls} cannot cross a chunk boundary")
    for name in ("callback", "errback"):
        func = getattr(request, name)
        if func is None or not callable(func):
            continue
        own = getattr(spider, getattr(func, "__name__", ""), None)
        if own is not None and getattr(own, "__func__", None) is getattr(func, "__func__", 0):
            continue
        try:  # a method under another name: Scrapy's own (slower) search finds it
            request.to_dict(spider=spider)
        except ValueError:
            raise CodecError(
                f"{where}: its {name} {getattr(func, '__qualname__', func)!r} is not a spider"
                " method (a chunk hands a request on by its callback's name)"
            ) from None
    encode_value(request.meta, f"{where}: meta")
    encode_value(request.cb_kwargs, f"{where}: cb_kwargs")
    encode_value(request.cookies, f"{where}: cookies")


def request_from_json(data: dict[str, Any], spider: Spider) -> Request:
    """Rebuild a request; callbacks are looked up by name on ``spider`` only."""
    from scrapy.utils.misc import load_object

    d = decode_value(data)
    cls_name = d.pop("_class", "scrapy.http.request.Request")
    if cls_name not in REQUEST_CLASSES:
        raise CodecError(f"request class {cls_name!r} is not allowed")
    cls = load_object(REQUEST_CLASSES[cls_name])
    d["headers"] = {k: list(v) for k, v in (d.get("headers") or {}).items()}
    kwargs = {k: v for k, v in d.items() if k in cls.attributes}
    for name in ("callback", "errback"):
        if d.get(name):
            method = getattr(spider, d[name], None)
            if not callable(method):
                raise CodecError(f"spider {spider.name} has no method {d[name]!r}")
            kwargs[name] = method
    request: Request = cls(**kwargs)
    return request
