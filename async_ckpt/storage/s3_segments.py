"""A segmented object on S3 (`base.SegmentedWriter`): one multipart upload, one part range per
segment.

``S3Storage.open_segmented`` creates the upload on the owner's thread. Segment i gets part numbers
``[1 + i*R, 1 + (i+1)*R)`` with R = 10,000 // segments, and uploads them from its own thread through
an `s3_writer.S3StreamWriter` bound to that range (``upload_concurrency`` parts in flight per
segment, the part size doubling every R // 10 parts so a segment's range reaches as far as a whole
object's 10,000 parts do). Part sizes are rounded up to SEGMENT_ALIGN so segments start aligned.

S3 requires every part but the object's last to be at least 5 MiB: a segment that is not the
last closes with its final part zero-padded to at least 5 MiB and to a multiple of SEGMENT_ALIGN,
so each of a node's ranks but the last may add up to 5 MiB of zeros per save.
Part numbers may have gaps (S3 concatenates the parts it is given in number order), so segment i's
offset is the sum of the bytes the segments before it sent, known at ``commit``
(CompleteMultipartUpload: the object appears whole, or not at all). ``abort`` stops every
segment's part uploads and aborts the upload; a killed writer's upload is aborted by the next
``delete_dir`` of its folder, as for any streamed object.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

from .base import SEGMENT_ALIGN, ObjectLayout
from .s3_writer import MAX_PARTS, S3StreamWriter, UploadTarget, abort_upload, complete_upload

MIN_PART = 5 << 20         # S3's smallest part but the last
_GROW_FRACTION = 10        # a segment's part size doubles every (its parts // 10) parts


def _align(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


class _S3Segment:
    """One segment's stream; used by one thread."""

    def __init__(self, owner: "S3SegmentedWriter", index: int, writer: S3StreamWriter):
        self._owner, self._index, self._writer = owner, index, writer
        self._capacity = owner.capacities[index]
        self.written = 0

    def write(self, data: memoryview) -> None:
        n = memoryview(data).nbytes
        if self.written + n > self._capacity:
            raise ValueError(f"segment {self._index} was given {self._capacity} bytes and got more; "
                             "the writer's capacity estimate is wrong")
        self._writer.write(data)
        self.written += n

    def close(self) -> int:
        last = self._index == len(self._owner.capacities) - 1
        if last:
            self._writer.finish()
        else:       # S3's minimum part, and a length that keeps the next segment aligned
            self._writer.finish(MIN_PART, SEGMENT_ALIGN)
        self._owner.closed(self._index, self.written)
        return self.written


class S3SegmentedWriter:
    """The segments of one multipart upload; see the module docstring."""
    parallel = True

    def __init__(self, target: UploadTarget, capacities: Sequence[int]):
        self.capacities = [int(c) for c in capacities]
        if len(self.capacities) > MAX_PARTS:
            raise ValueError(f"{target.url}: {len(self.capacities)} segments, more than S3's "
                             f"{MAX_PARTS} parts")
        self._t = dataclasses.replace(target, part_size=_align(target.part_size))
        self._range = MAX_PARTS // max(1, len(self.capacities))
        self._writers: list[S3StreamWriter | None] = [None] * len(self.capacities)
        self._lengths: list[int | None] = [None] * len(self.capacities)
        self._lock = threading.Lock()
        self._done = False
        self._upload_id: str = self._t.run(self._t.request("create_multipart_upload"))["UploadId"]

    def segment(self, index: int) -> _S3Segment:
        with self._lock:
            if self._writers[index] is not None or self._done:
                raise ValueError(f"segment {index} of {self._t.url} was written already")
            writer = S3StreamWriter(self._t, upload_id=self._upload_id,
                                    first_part=1 + index * self._range, max_parts=self._range,
                                    grow_every=max(1, self._range // _GROW_FRACTION))
            self._writers[index] = writer
        return _S3Segment(self, index, writer)

    def closed(self, index: int, length: int) -> None:
        with self._lock:
            self._lengths[index] = length

    def commit(self) -> ObjectLayout:
        t = self._t
        for i, w in enumerate(self._writers):
            if w is not None and self._lengths[i] is None:
                raise ValueError(f"{t.url}: commit while segment {i} is still open")
        self._done = True
        segments, etags, pos = [], {}, 0
        for i, w in enumerate(self._writers):
            segments.append((pos, self._lengths[i] or 0))
            if w is not None:
                pos += w.stored
                etags.update(w.etags)
        if etags:
            t.run(complete_upload(t, self._upload_id, etags, pos))
        else:                        # every segment empty: S3 completes no upload without parts
            abort_upload(t, self._upload_id)
            t.run(t.request("put_object", Body=b""))
        return ObjectLayout(pos, tuple(segments))

    def abort(self) -> None:
        """Stop every segment's parts and abort the upload; never raises."""
        self._done = True
        for w in self._writers:
            if w is not None:
                w.abort()
        abort_upload(self._t, self._upload_id)
