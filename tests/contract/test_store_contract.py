"""The Store contract: an S3-like object store with atomic writes and write-if-absent.

Only Protocol methods are used, so the same tests hold for every backend.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fanout.backends.base import Backend

Opener = Callable[[], Backend]

BAD_KEYS = [
    "",
    "/abs/key",
    "..",
    "../escape",
    "runs/../../escape",
    "runs/..",
    ".",
    "runs/./x",
    "runs//x",
    "runs/x/",
    "runs\\x",
    "..\\escape",
]


def test_put_get_round_trip(backend: Backend) -> None:
    store = backend.store
    data = bytes(range(256)) * 10
    assert store.put("runs/r1/data/0.avro", data) is True
    assert store.get("runs/r1/data/0.avro") == data


def test_put_empty_object(backend: Backend) -> None:
    backend.store.put("runs/r1/empty", b"")
    assert backend.store.exists("runs/r1/empty")
    assert backend.store.get("runs/r1/empty") == b""


def test_put_from_file_object(backend: Backend) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # bigger than any copy buffer
    assert backend.store.put("runs/r1/big.bin", io.BytesIO(data)) is True
    assert backend.store.get("runs/r1/big.bin") == data


def test_put_overwrites(backend: Backend) -> None:
    store = backend.store
    store.put("k", b"old")
    assert store.put("k", b"new") is True
    assert store.get("k") == b"new"


def test_open_reads_the_object(backend: Backend) -> None:
    backend.store.put("runs/r1/x", b"abc" * 1000)
    with backend.store.open("runs/r1/x") as f:
        assert f.read(3) == b"abc"
        assert f.read() == b"abc" * 999


def test_exists_and_delete(backend: Backend) -> None:
    store = backend.store
    assert store.exists("runs/r1/x") is False
    store.put("runs/r1/x", b"1")
    assert store.exists("runs/r1/x") is True
    store.delete("runs/r1/x")
    assert store.exists("runs/r1/x") is False
    store.delete("runs/r1/x")  # deleting a missing key is fine
    store.delete("never/was")


def test_a_prefix_is_not_an_object(backend: Backend) -> None:
    store = backend.store
    store.put("runs/r1/x", b"1")
    assert store.exists("runs/r1") is False
    with pytest.raises(KeyError):
        store.get("runs/r1")
    store.delete("runs/r1")  # not an object: nothing happens
    assert store.get("runs/r1/x") == b"1"


def test_missing_key_raises_key_error(backend: Backend) -> None:
    with pytest.raises(KeyError) as get_error:
        backend.store.get("runs/nope/x")
    assert get_error.value.args[0] == "runs/nope/x"
    with pytest.raises(KeyError) as open_error:
        backend.store.open("runs/nope/x")
    assert open_error.value.args[0] == "runs/nope/x"


def test_if_absent_writes_once(backend: Backend) -> None:
    store = backend.store
    assert store.put("runs/r1/_manifest.json", b"first", if_absent=True) is True
    assert store.put("runs/r1/_manifest.json", b"second", if_absent=True) is False
    assert store.put("runs/r1/_manifest.json", io.BytesIO(b"third"), if_absent=True) is False
    assert store.get("runs/r1/_manifest.json") == b"first"
    # No leftovers from the losing writes.
    assert list(store.list("runs/r1/")) == ["runs/r1/_manifest.json"]


def test_if_absent_race_has_exactly_one_winner(backend: Backend) -> None:
    store = backend.store
    writers = 8
    wins: list[int] = []
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            start.wait(30)
            if store.put("runs/r1/claim", f"writer {i}".encode() * 10_000, if_absent=True):
                wins.append(i)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(wins) == 1
    assert store.get("runs/r1/claim") == f"writer {wins[0]}".encode() * 10_000
    assert list(store.list("runs/r1/")) == ["runs/r1/claim"]


def test_list_is_sorted_and_uses_plain_string_prefixes(backend: Backend) -> None:
    store = backend.store
    keys = [
        "runs/abc/data/y",
        "runs/abc/data/x",
        "runs/abc/_manifest.json",
        "runs/abc.txt",
        "runs/abd/z",
        "other/k",
        "top",
    ]
    for key in keys:
        store.put(key, b"-")
    assert list(store.list("")) == sorted(keys)
    assert list(store.list("runs/abc/")) == [
        "runs/abc/_manifest.json",
        "runs/abc/data/x",
        "runs/abc/data/y",
    ]
    # A partial last segment matches like a string prefix, not like a directory.
    assert list(store.list("runs/abc/da")) == ["runs/abc/data/x", "runs/abc/data/y"]
    # Whole keys are sorted as strings: "." sorts before "/".
    assert list(store.list("runs/abc")) == [
        "runs/abc.txt",
        "runs/abc/_manifest.json",
        "runs/abc/data/x",
        "runs/abc/data/y",
    ]
    assert list(store.list("runs/ab")) == sorted(k for k in keys if k.startswith("runs/ab"))
    assert list(store.list("t")) == ["top"]
    assert list(store.list("top")) == ["top"]
    assert list(store.list("runs/zzz/")) == []
    assert list(store.list("nothing")) == []


def test_list_after_delete(backend: Backend) -> None:
    store = backend.store
    store.put("runs/r1/a", b"1")
    store.put("runs/r1/b", b"2")
    store.delete("runs/r1/a")
    assert list(store.list("runs/")) == ["runs/r1/b"]
    store.delete("runs/r1/b")
    assert list(store.list("runs/")) == []


def test_list_while_writing(backend: Backend) -> None:
    """Listing is safe during writes: it sees only whole objects."""
    if backend.name == "aws":
        # moto's in-process S3 is not thread-safe: a put that replaces a key
        # closes the buffer a concurrent list reads the key's ETag from
        # ("I/O operation on closed file", met under pytest -n 3).
        pytest.skip("moto's in-process S3 is not a concurrency test")
    store = backend.store
    store.put("runs/r1/kept", b"x")
    done = threading.Event()

    def writer() -> None:
        i = 0
        while not done.is_set():
            store.put(f"runs/r1/w{i % 5}", os.urandom(64 * 1024))
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(50):
            listed = list(store.list("runs/r1/"))
            assert set(listed) <= {"runs/r1/kept", *(f"runs/r1/w{i}" for i in range(5))}
            assert "runs/r1/kept" in listed
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected(backend: Backend, key: str) -> None:
    store = backend.store
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.put(key, b"x", if_absent=True)
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.open(key)
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete(key)
    with pytest.raises(ValueError):
        store.url(key)
    assert list(store.list("")) == [], "nothing was written"


@pytest.mark.parametrize("prefix", ["/abs", "../x", "runs/../x", "runs//", "a\\b", ".."])
def test_bad_prefixes_are_rejected(backend: Backend, prefix: str) -> None:
    with pytest.raises(ValueError):
        list(backend.store.list(prefix))


def test_url_names_the_object(backend: Backend) -> None:
    store = backend.store
    store.put("runs/r1/data/0.avro", b"avro")
    url = store.url("runs/r1/data/0.avro")
    if backend.name == "local":
        # The local store's URL is a path a person (or another tool) can open.
        assert Path(url).is_absolute() and url.endswith("/store/runs/r1/data/0.avro")
        assert Path(url).read_bytes() == b"avro"
    elif backend.name == "aws":
        from fanout.backends.aws import AwsSettings

        assert url == f"s3://{AwsSettings.from_env().bucket}/runs/r1/data/0.avro"
    else:
        assert url == "memory://runs/r1/data/0.avro"


def test_objects_survive_reopen(backend: Backend, reopen: Opener) -> None:
    backend.store.put("runs/r1/a", b"1")
    backend.store.put("runs/r1/_manifest.json", b"{}", if_absent=True)
    again = reopen()
    assert again.store.get("runs/r1/a") == b"1"
    assert list(again.store.list("runs/r1/")) == ["runs/r1/_manifest.json", "runs/r1/a"]
    assert again.store.put("runs/r1/_manifest.json", b"{}", if_absent=True) is False


def test_stores_on_the_same_home_see_each_other(backend: Backend, open_same: Opener) -> None:
    other = open_same()
    backend.store.put("runs/r1/a", b"1")
    assert other.store.get("runs/r1/a") == b"1"
    assert other.store.put("runs/r1/a", b"2", if_absent=True) is False
    other.store.delete("runs/r1/a")
    assert backend.store.exists("runs/r1/a") is False
