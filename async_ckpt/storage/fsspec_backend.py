"""Any fsspec filesystem (memory://, s3://, gcs://, ...). Objects appear when their write closes."""
from __future__ import annotations

import errno
import logging
from typing import Any, Sequence

from .base import scratch_name
from .segments import SequentialSegments

log = logging.getLogger("async_ckpt.storage")


class _FsspecWriter:
    def __init__(self, fs: Any, path: str):
        self._fs, self._path = fs, path
        self._f = fs.open(path, "wb")

    def write(self, data: memoryview) -> None:
        self._f.write(data)

    def commit(self) -> None:
        self._f.close()

    def abort(self) -> None:
        try:
            discard = getattr(self._f, "discard", None)  # s3fs: abort the multipart upload
            discard() if discard else self._f.close()
        except Exception:  # noqa: BLE001 - abort must never raise
            pass
        try:
            self._fs.rm(self._path)
        except Exception:  # noqa: BLE001
            pass


class FsspecStorage:
    """Storage on an fsspec filesystem under `root` (a path inside that filesystem)."""

    def __init__(self, fs: Any, root: str, url: str):
        self.fs, self.root, self.url = fs, root.rstrip("/"), url.rstrip("/")

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def check_root(self) -> None:
        return None   # object stores have no "file in the way"; check_writable probes on first save

    def check_writable(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        probe = self._p(scratch_name("write-probe"))
        self.fs.pipe_file(probe, b"")
        self.fs.rm(probe)

    def open_writer(self, path: str) -> _FsspecWriter:
        return _FsspecWriter(self.fs, self._p(path))

    def open_segmented(self, path: str, capacities: Sequence[int]) -> SequentialSegments:
        """Segments one after another through one stream (``parallel`` is false)."""
        return SequentialSegments(self.open_writer(path), capacities, self.child_url(path))

    def create_exclusive(self, path: str, data: bytes) -> None:
        full = self._p(path)
        try:
            self.fs.pipe_file(full, data, mode="create")
            return
        except TypeError:
            pass  # this filesystem has no exclusive mode: fall back to check-then-write
        if self.fs.exists(full):
            raise FileExistsError(full)
        self.fs.pipe_file(full, data)

    def sync_dir(self, path: str) -> None:
        return None

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(self._p(path))

    def _regular(self, path: str) -> int:
        """The size of `path`, which must be a file (not a folder, link or anything else the
        filesystem reports)."""
        info = self.fs.info(self._p(path))
        kind = info.get("type", "file")
        if kind != "file" or info.get("islink"):
            raise OSError(errno.EINVAL, f"{self.child_url(path)} is {'a link' if info.get('islink') else kind!r}, "
                                        "not a regular file; refusing to read it")
        return int(info.get("size") or 0)

    def read_limited(self, path: str, limit: int) -> bytes:
        if self._regular(path) > limit:
            raise OSError(errno.EFBIG, f"{self.child_url(path)} holds more than the {limit} bytes "
                                       "a file of its kind may have")
        data = self.fs.cat_file(self._p(path), start=0, end=limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"{self.child_url(path)} grew past {limit} bytes while being read")
        return bytes(data)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        data = self.fs.cat_file(self._p(path), start=offset, end=offset + len(out))
        if len(data) != len(out):
            raise EOFError(f"{self._p(path)} ends before offset {offset} + {len(out)}")
        out.cast("B")[:] = data

    def size(self, path: str) -> int:
        return self._regular(path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def list_dir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(self._p(path), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def find_named(self, name: str, max_requests: int = 0) -> list[str] | None:
        """Folders directly under the root holding an entry `name` (see base.py), from one
        ``fs.find`` of the root two levels deep (an object store's recursive listing, whose pages
        fsspec does not let us count: the caller's request bound is not checked, beyond refusing
        a bound below 1)."""
        if max_requests < 1:
            return None
        root = self._p("").rstrip("/") + "/"
        found = set()
        for path in self.fs.find(self._p(""), maxdepth=2, withdirs=False):
            folder, _, rest = path.rstrip("/")[len(root):].partition("/") if path.startswith(root) \
                else ("", "", "")
            if folder and rest == name:
                found.add(folder)
        return sorted(found)

    def delete(self, path: str) -> None:
        try:
            self.fs.rm(self._p(path))
        except FileNotFoundError:
            pass

    def delete_dir(self, path: str) -> None:
        try:
            self.fs.rm(self._p(path), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - best effort, as the protocol says
            log.warning("could not remove everything under %s (%s); the next cleanup retries",
                        self.child_url(path), exc)

    def child_url(self, path: str) -> str:
        return f"{self.url}/{path}" if path else self.url

    def resolves_inside(self, folder: str, name: str) -> bool:
        return True  # object stores have no symlinks; names are already confined by the manifest check
