"""An object store in a directory: key ``runs/<id>/x.avro`` is file ``ROOT/runs/<id>/x.avro``.

Writes go to a temporary file beside the target and are moved into place in one
step (``os.replace``, or ``os.link`` for write-if-absent), so a reader sees the
old object, the new one or none, never half a file, even across processes.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fanout.backends.keys import TEMP_PREFIX, check_key, check_prefix


class DirStore:
    """The :class:`~fanout.backends.base.Store` of the local backend."""

    def __init__(self, root: str | Path) -> None:
        # Absolute, so url() stays right if the process changes directory later.
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> bool:
        """Write the object atomically; with ``if_absent``, only if the key does not
        exist yet (of two concurrent writers exactly one wins). Returns whether it wrote."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # In the target's directory: link() and replace() only work within one filesystem.
        tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        # O_EXCL: never write into another writer's temp file (and outside the try:
        # if it exists, it is not ours to delete). Mode 0o666 less the umask, unlike
        # mkstemp's 0o600, so objects get the usual permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                else:
                    shutil.copyfileobj(data, f)
                f.flush()
                # The data must be on disk before the name points at it, or a crash
                # could leave a complete-looking name over an empty file.
                os.fsync(f.fileno())
            if if_absent:
                try:
                    # link() fails if the target exists, atomically: unlike an
                    # exists() check followed by replace(), two writers cannot both win.
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
            return True
        finally:
            # Also on errors and KeyboardInterrupt: leave no temp file behind
            # (after a replace there is none, hence missing_ok).
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` if missing."""
        with self.open(key) as f:
            return f.read()

    def open(self, key: str) -> BinaryIO:
        """A binary file object to read (the caller closes it); ``KeyError`` if missing."""
        path = self._path(key)
        try:
            return builtins.open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # A directory is a "common prefix" in S3 terms, not an object.
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix, as in S3), sorted."""
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names in full, and in it only
        # the entries matching the prefix's partial last segment.
        base_dir, _, partial = prefix.rpartition("/")
        start = self.root.joinpath(*base_dir.split("/")) if base_dir else self.root
        keys = list(self._walk(start, base_dir, partial))
        # Sort whole keys: directory order differs ("a.x" < "a/b" as strings).
        keys.sort()
        return iter(keys)

    def _walk(self, directory: Path, key_prefix: str, name_prefix: str = "") -> Iterator[str]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) or not entry.name.startswith(name_prefix):
                continue  # a temp file is another writer's object in progress
            key = f"{key_prefix}/{entry.name}" if key_prefix else entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key)
            elif entry.is_file():
                yield key

    def delete(self, key: str) -> None:
        """Remove the object if present."""
        path = self._path(key)
        # Deleting a missing key (or a mere prefix) is not an error, as in S3.
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            path.unlink()

    def url(self, key: str) -> str:
        """The object's absolute filesystem path."""
        return str(self._path(key))

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""
