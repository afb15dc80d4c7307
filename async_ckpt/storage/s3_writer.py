"""Streamed writes to S3: one multipart upload per object, parts uploaded concurrently.

`write` copies the caller's bytes into a part buffer (so the caller may reuse its memory as soon as
`write` returns) and, when a part is full, starts its upload on the client's event loop. At most
`upload_concurrency` parts are in flight; their buffers are recycled, so memory stays at
(upload_concurrency + 1) x part_size whatever the object's size, with no whole-object copy.
Nothing is visible under the key until `commit` completes the upload (an object smaller than one
part is sent as one PUT at commit, equally atomic). `abort` aborts the upload.

The writer knows S3's multipart protocol and nothing of `S3Storage`: it sees only an
`UploadTarget` (the object's key and URL, the part settings, and three functions: send one request
for this object, run a coroutine on the client's loop and wait, start one there). `S3Storage` builds
the target in `open_writer`; this module imports nothing from `s3.py`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine

log = logging.getLogger("async_ckpt.storage")

MAX_PARTS = 10_000
_GROW_EVERY = 1000   # parts; doubling the part size then keeps 10,000 parts above 150 TiB


@dataclass(frozen=True)
class UploadTarget:
    """Everything one streamed upload needs from its storage.

    ``request(method, *, tries=None, **kwargs)`` returns an awaitable of one S3 request on this
    object (``Bucket`` and ``Key`` filled in), retried and translated into the storage errors;
    each try appends to ``tries`` when given. ``run(coro)`` runs a coroutine on the client's event
    loop and returns its result; ``start(coro)`` schedules it there and returns a
    ``concurrent.futures.Future``. All are called from the one thread that uses the writer.
    """
    key: str
    url: str
    part_size: int
    upload_concurrency: int
    request: Callable[..., Coroutine[Any, Any, Any]]
    run: Callable[[Awaitable[Any]], Any]
    start: Callable[[Coroutine[Any, Any, Any]], "concurrent.futures.Future[Any]"]


class S3StreamWriter:
    """StreamWriter for one S3 object. Used by one thread (the node writer).

    As one segment of a `S3SegmentedWriter` it is given the upload (`upload_id`, which it then
    never aborts) and its range of part numbers (`first_part`, `max_parts`, the part size
    doubling every `grow_every` parts of the range), and ends with `finish` instead of `commit`."""

    def __init__(self, target: UploadTarget, *, upload_id: str | None = None, first_part: int = 1,
                 max_parts: int = MAX_PARTS, grow_every: int = _GROW_EVERY):
        self._t = target
        self._url = target.url
        self._first, self._limit, self._grow = first_part, first_part + max_parts, grow_every
        self._owns_upload = upload_id is None
        self._buf = bytearray(self._part_size(first_part))
        self._fill = 0
        self._spare: list[bytearray] = []
        self._inflight: collections.deque = collections.deque()   # (number, buffer, future)
        self.etags: dict[int, str] = {}
        self._upload_id: str | None = upload_id
        self._next_part = first_part
        self._size = 0
        self.stored = 0          # bytes sent in parts (padding included)
        self._closed = False

    def _part_size(self, number: int) -> int:
        return self._t.part_size << ((number - self._first) // self._grow)

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

    def _send_part(self, pad: int = 0) -> None:
        t = self._t
        if self._upload_id is None:
            self._upload_id = t.run(t.request("create_multipart_upload"))["UploadId"]
        number = self._next_part
        if number >= self._limit:
            raise OSError(f"{self._url} would need more than {self._limit - self._first} parts"
                          f"{'' if self._owns_upload else ' in one segment'}; raise "
                          "storage_options['part_size']")
        while len(self._inflight) >= t.upload_concurrency:
            self._reap_oldest()
        full = self._fill == len(self._buf) and not pad
        body = self._buf if full else bytes(memoryview(self._buf)[:self._fill]) + bytes(pad)
        self.stored += len(body)
        future = t.start(t.request("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body))
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
        self.etags[number] = future.result()["ETag"]
        self._spare.append(buf)

    def commit(self) -> None:
        """Upload what is left and complete the upload: the object appears whole, or not at all."""
        assert not self._closed, "commit after commit/abort"
        t = self._t
        if self._upload_id is None:
            t.run(t.request("put_object", Body=bytes(memoryview(self._buf)[:self._fill])))
        else:
            if self._fill:
                self._send_part()
            while self._inflight:
                self._reap_oldest()
            t.run(complete_upload(t, self._upload_id, self.etags, self._size))
        self._closed = True
        self._buf, self._spare = bytearray(), []

    def finish(self, min_last: int = 0, align: int = 1) -> None:
        """As a segment: send what is left as the last part, zero-padded to at least `min_last`
        bytes and to a multiple of `align`, and wait for every part of the segment."""
        assert not self._closed and not self._owns_upload, "finish is for segments"
        if self._fill:
            padded = max(min_last, -(-self._fill // align) * align)
            self._send_part(pad=padded - self._fill)
        while self._inflight:
            self._reap_oldest()
        self._closed = True
        self._buf, self._spare = bytearray(), []

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
        if self._upload_id is not None and self._owns_upload:
            abort_upload(self._t, self._upload_id)


def abort_upload(t: UploadTarget, upload_id: str) -> None:
    """Abort a multipart upload; never raises (what fails is left to the next cleanup)."""
    try:
        t.run(t.request("abort_multipart_upload", UploadId=upload_id))
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - abort must never raise; delete_dir retries it
        log.warning("could not abort the multipart upload of %s (%r); the next cleanup of its "
                    "folder aborts it", t.url, exc)


async def complete_upload(t: UploadTarget, upload_id: str, etags: dict[int, str], size: int) -> None:
    """CompleteMultipartUpload of the parts `etags` (part number -> ETag) of an object of `size`
    bytes; a lost answer to a try that completed it is recognised by the object's size."""
    parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
    tries: list = []
    try:
        await t.request("complete_multipart_upload", tries=tries, UploadId=upload_id,
                        MultipartUpload={"Parts": parts})
    except FileNotFoundError:
        # NoSuchUpload after a retry: the first try completed but its answer was lost.
        if len(tries) < 2:
            raise
        head = await t.request("head_object")
        if int(head["ContentLength"]) != size:
            raise
