"""Scrapy requests and items as JSON, never pickle.

A pending request crosses a chunk boundary inside a queue message, so it must
survive as data: URL, method, headers, body, cookies, callback and errback by
name, ``cb_kwargs``, ``meta`` (depth, retry counts and the user's own keys),
priority, ``dont_filter`` and flags. Values JSON has no type for (bytes,
datetimes, decimals, tuples) travel tagged, as ``{"$bytes": "<base64>"}`` and
the like. Request classes are limited to Scrapy's own: a message is untrusted
input, and loading a class named by it would import arbitrary code.

Items in ``meta`` or ``cb_kwargs`` (Scrapy's common "pass the item on to the
next page" pattern) travel as ``{"$item": {"class": "module:Qual", "fields":
{...}}}`` and are rebuilt as the same class. For the same reason as requests,
a message may only name an item class of its spider (:class:`ItemScope`: a
:class:`scrapy.Item` subclass or a dataclass that the spider's module defines
or imports), found by a lookup in namespaces already loaded, never imported;
and only the class's own fields are set. An item is checked to rebuild equal
to itself when its request is scheduled, so one that cannot (an ``InitVar``,
a ``__post_init__`` that changes its fields) fails there, not chunks later.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import sys
from decimal import Decimal
from types import ModuleType
from typing import Any, cast

from scrapy import Item, Request, Spider

#: Request classes a message may name (anything else is refused).
REQUEST_CLASSES = {
    "scrapy.http.request.Request": "scrapy.http.Request",
    "scrapy.http.request.form.FormRequest": "scrapy.http.FormRequest",
    "scrapy.http.request.json_request.JsonRequest": "scrapy.http.JsonRequest",
}


class CodecError(ValueError):
    """A value that cannot travel as JSON, or a request dict that is not acceptable."""


class ItemScope:
    """The item classes a spider's messages may carry: the :class:`scrapy.Item`
    subclasses and dataclasses its module defines or imports, by name or as an
    attribute of a module it imports. Read from the module's namespace as it
    is (``vars``, never ``getattr``: a module's lazy ``__getattr__`` could
    import code), and read again when that namespace changes size."""

    _cache: dict[str, tuple[int, dict[str, type]]] = {}

    def __init__(self, spider: Spider) -> None:
        self.module = type(spider).__module__

    def classes(self) -> dict[str, type]:
        """``"module:Qual"`` → class."""
        module = sys.modules.get(self.module)
        if module is None:
            return {}
        names = vars(module)
        cached = self._cache.get(self.module)
        if cached is not None and cached[0] == len(names):
            return cached[1]
        found: dict[str, type] = {}
        for value in list(names.values()):
            for c in list(vars(value).values()) if isinstance(value, ModuleType) else (value,):
                if _is_item_class(c):
                    found[f"{c.__module__}:{c.__qualname__}"] = c
        self._cache[self.module] = (len(names), found)
        return found


def _is_item_class(value: Any) -> bool:
    return isinstance(value, type) and (issubclass(value, Item) or dataclasses.is_dataclass(value))


def encode_value(value: Any, where: str = "value", scope: ItemScope | None = None) -> Any:
    """``value`` as JSON-able data, with tags for bytes, datetimes, decimals,
    tuples, and (given the spider's ``scope``) its item classes."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f"{where}: key {k!r} is not a string")
            out[k] = encode_value(v, f"{where}.{k}", scope)
        # A user dict that looks like a tag is escaped, so it decodes to itself.
        return {"$dict": out} if len(out) == 1 and next(iter(out)).startswith("$") else out
    if isinstance(value, list):
        return [encode_value(v, f"{where}[{i}]", scope) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v, f"{where}[{i}]", scope) for i, v in enumerate(value)]}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, Item) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return {"$item": _encode_item(value, where, scope)}
    raise CodecError(f"{where}: {type(value).__name__} cannot travel as JSON (no pickle)")


def decode_value(value: Any, scope: ItemScope | None = None) -> Any:
    """The inverse of :func:`encode_value`."""
    if isinstance(value, list):
        return [decode_value(v, scope) for v in value]
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
            return tuple(decode_value(v, scope) for v in inner)
        if tag == "$dict":
            return {k: decode_value(v, scope) for k, v in inner.items()}
        if tag == "$item":
            return _decode_item(inner, scope)
    return {k: decode_value(v, scope) for k, v in value.items()}


def _encode_item(item: Any, where: str, scope: ItemScope | None) -> dict[str, Any]:
    cls = type(item)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if scope is None or scope.classes().get(name) is not cls:
        raise CodecError(
            f"{where}: item class {cls.__qualname__} is not defined or imported in the"
            f" spider's module{f' ({scope.module})' if scope else ''}: a chunk could not rebuild it"
        )
    try:
        fields = _fields_of(item)
        same = _fields_of(_build(cls, fields)) == fields
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise CodecError(
            f"{where}: item class {cls.__qualname__} cannot be rebuilt from its fields: {exc}"
        ) from None
    if not same:
        raise CodecError(
            f"{where}: item class {cls.__qualname__} rebuilt from its fields is not equal to"
            " itself (a __post_init__ that changes them?)"
        )
    out = {k: encode_value(v, f"{where}.{k}", scope) for k, v in fields.items()}
    return {"class": name, "fields": out}


def _fields_of(item: Any) -> dict[str, Any]:
    if isinstance(item, Item):
        return dict(item)
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}


def _build(cls: type, fields: dict[str, Any]) -> Any:
    """An item of ``cls`` with ``fields``, which must all be its own."""
    if issubclass(cls, Item):
        unknown = set(fields) - set(cls.fields)
        if not unknown:
            return cls(fields)
    else:
        own = {f.name: f.init for f in dataclasses.fields(cast(Any, cls))}
        unknown = set(fields) - set(own)
        if not unknown:
            item = cls(**{k: v for k, v in fields.items() if own[k]})
            for k, v in fields.items():
                if not own[k]:
                    object.__setattr__(item, k, v)  # set after __init__ (frozen ones too)
            return item
    raise KeyError(f"{cls.__qualname__} has no field {sorted(unknown)[0]!r}")


def _decode_item(data: Any, scope: ItemScope | None) -> Any:
    name = data.get("class") if isinstance(data, dict) else None
    cls = scope.classes().get(name) if scope is not None and isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"item class {name!r} is not an item class of this spider")
    fields = data.get("fields")
    if not isinstance(fields, dict):
        raise CodecError(f"item {name!r}: its fields are not an object")
    try:
        return _build(cls, {k: decode_value(v, scope) for k, v in fields.items()})
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise CodecError(f"item {name!r} cannot be rebuilt: {exc}") from None


def request_to_json(request: Request, spider: Spider) -> dict[str, Any]:
    """A request as JSON-able data; :class:`CodecError` names what cannot travel."""
    d = request.to_dict(spider=spider)
    cls = d.pop("_class", "scrapy.http.request.Request")
    if cls not in REQUEST_CLASSES:
        raise CodecError(f"request {request.url}: class {cls} cannot cross a chunk boundary")
    d["headers"] = {
        k.decode("latin-1"): [v.decode("latin-1") for v in vs] for k, vs in d["headers"].items()
    }
    out = encode_value(d, f"request {request.url}", ItemScope(spider))
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
    scope = ItemScope(spider)
    encode_value(request.meta, f"{where}: meta", scope)
    encode_value(request.cb_kwargs, f"{where}: cb_kwargs", scope)
    encode_value(request.cookies, f"{where}: cookies")


def request_from_json(data: dict[str, Any], spider: Spider) -> Request:
    """Rebuild a request; callbacks are looked up by name on ``spider`` only."""
    from scrapy.utils.misc import load_object

    d = decode_value(data, ItemScope(spider))
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
