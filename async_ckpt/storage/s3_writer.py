"""Streamed writes to S3: one multipart upload per object, parts uploaded concurrently.

`write` copies the caller's bytes into a part buffer (so the caller may reuse its memory as soon as
`write` returns) and, when a part is full, starts its upload on s3fs's event loop. At most
`upload_concurrency` parts are in flight; their buffers are recycled, so memory stays at
(upload_concurrency + 1) x part_size whatever the object's size, with no whole-object copy.
Nothing is visible under the key until `commit` completes the upload (an object smaller than one
part is sent as one PUT at commit, equally atomic). `abort` aborts the upload.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .s3 import S3Storage

log = logging.getLogger("async_ckpt.storage")

MAX_PARTS = 10_000
_GROW_EVERY = 1000   # parts; doubling the part size then keeps 10,000 parts above 150 TiB


class S3StreamWriter:
    """StreamWriter for one S3 object. Used by one thread (the node writer)."""

    def __init__(self, store: "S3Storage", path: str):
        self._store, self._path, self._key = store, path, store.key(path)
        self._url = store.child_url(path)
        self._buf = bytearray(self._part_size(1))
        self._fill = 0
        self._spare: list[bytearray] = []
        self._inflight: collections.deque = collections.deque()   # (number, buffer, future)
        self._etags: dict[int, str] = {}
        self._upload_id: str | None = None
        self._next_part = 1
        self._size = 0
        self._closed = False

    def _part_size(self, number: int) -> int:
        return self._store.settings.part_size << ((number - 1) // _GROW_EVERY)

    def write(self, data: memoryview) -> None:
        """Append `data`; blocks only while `upload_concurrency` parts are already in flight."""
        assert not self._closed, "write after commit/abort"
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        while len(view):
            n = min(len(self._buf) - self._fill, len(view))
            self._buf[self._fill:self._fill + n] = view[:n]
            self._fill += n
            self._size += n
            view = view[n:]
            if self._fill == len(self._buf):
                self._send_part()

    def _send_part(self) -> None:
        store = self._store
        if self._upload_id is None:
            created = store.run(store.call("create_multipart_upload", self._path, Key=self._key))
            self._upload_id = created["UploadId"]
        number = self._next_part
        if number > MAX_PARTS:
            raise OSError(f"{self._url} would need more than {MAX_PARTS} parts; raise "
                          "storage_options['part_size']")
        while len(self._inflight) >= store.settings.upload_concurrency:
            self._reap_oldest()
        full = self._fill == len(self._buf)
        body = self._buf if full else bytes(memoryview(self._buf)[:self._fill])
        coro = store.call("upload_part", self._path, Key=self._key, UploadId=self._upload_id,
                          PartNumber=number, Body=body)
        future = asyncio.run_coroutine_threadsafe(coro, store.fs.loop)
        self._inflight.append((number, self._buf, future))
        self._next_part += 1
        size = self._part_size(self._next_part)
        spare = [b for b in self._spare if len(b) == size]
        self._buf = spare[0] if spare else bytearray(size)
        if spare:
            self._spare.remove(spare[0])
        self._fill = 0

    def _reap_oldest(self) -> None:
        number, buf, future = self._inflight.popleft()
        self._etags[number] = future.result()["ETag"]
        self._spare.append(buf)

    def commit(self) -> None:
        """Upload what is left and complete the upload: the object appears whole, or not at all."""
        assert not self._closed, "commit after commit/abort"
        store = self._store
        if self._upload_id is None:
            body = bytes(memoryview(self._buf)[:self._fill])
            store.run(store.call("put_object", self._path, Key=self._key, Body=body))
        else:
            if self._fill:
                self._send_part()
            while self._inflight:
                self._reap_oldest()
            parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
            store.run(self._complete(parts))
        self._closed = True
        self._buf, self._spare = bytearray(), []

    async def _complete(self, parts: list[dict]) -> None:
        store = self._store
        tries: list = []
        try:
            await store.call("complete_multipart_upload", self._path, tries=tries, Key=self._key,
                             UploadId=self._upload_id, MultipartUpload={"Parts": parts})
        except FileNotFoundError:
            # NoSuchUpload after a retry: the first try completed but its answer was lost.
            if len(tries) < 2:
                raise
            head = await store.call("head_object", self._path, Key=self._key)
            if int(head["ContentLength"]) != self._size:
                raise

    def abort(self) -> None:
        """Stop the part uploads and abort the multipart upload; never raises."""
        if self._closed:
            return
        self._closed = True
        futures = [f for _, _, f in self._inflight]
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures, timeout=30)
        self._inflight.clear()
        self._buf, self._spare = bytearray(), []
        if self._upload_id is None:
            return
        store = self._store
        try:
            store.run(store.call("abort_multipart_upload", self._path, Key=self._key,
                                 UploadId=self._upload_id))
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - abort must never raise; delete_dir retries it
            log.warning("could not abort the multipart upload of %s (%r); the next cleanup of its "
                        "folder aborts it", self._url, exc)
