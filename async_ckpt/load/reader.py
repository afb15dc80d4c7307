"""Reading a committed checkpoint back: verified byte ranges -> tensors -> nested state.

Each rank reads only the shards it needs. Adjacent records form one group, read as one byte range
(through readbuf: a private mapping of a local file, else a fresh buffer) and viewed in place; every
record's hash is checked chunk by chunk as the range arrives, before any of its bytes are used, and
zstd records are verified before they are decompressed (the pieces of one record decompress in
parallel, see codec.decompress_frames). Nothing here calls load_state_dict: restore.py does, after
every shard of the load was read and verified.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..format.codec import byte_view, check_frames, codec_width, decompress_frames, new_hasher, segments_hash
from ..errors import CheckpointError, CorruptCheckpointError, translate_storage_error
from ..format.manifest import Manifest, ShardEntry, TensorEntry
from ..format.names import read_manifest  # noqa: F401 - re-exported for the load path
from . import readbuf
from .readbuf import Filled, ReadSession
from ..storage import Storage, StorageError
from ..format.tree import dtype_from_name, unflatten

_MAX_GAP = 1 << 20   # read through gaps up to this size rather than issue another request
_OWN_STORAGE_BELOW = 1 << 16   # records smaller than this get their own storage (cheap)


def check_files(storage: Storage, folder: str, manifest: Manifest, names: set[str]) -> None:
    """Each needed data file exists inside the folder with exactly the size the manifest says,
    and is a regular file reached without a symlink below the root (Storage.size refuses the rest:
    a FIFO would hang the read, a symlink could lead anywhere)."""
    for name in sorted(names):
        url = storage.child_url(f"{folder}/{name}")
        try:
            size = storage.size(f"{folder}/{name}")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"data file {url} listed in the manifest is missing") from None
        except StorageError as exc:     # a CheckpointError, as restore's fallbacks expect
            raise translate_storage_error(exc) from exc
        except OSError as exc:
            raise CorruptCheckpointError(f"data file {url} cannot be used: {exc}") from exc
        if size != manifest.files[name].size:
            raise CorruptCheckpointError(
                f"data file {url} has {size} bytes, the manifest says {manifest.files[name].size} "
                "(truncated or overwritten)")


def _groups(entries: list[tuple[int, TensorEntry]]) -> list[list[tuple[int, TensorEntry]]]:
    groups: list[list[tuple[int, TensorEntry]]] = []
    for item in sorted(entries, key=lambda it: (it[1].file, it[1].offset)):
        last = groups[-1][-1][1] if groups else None
        if (last is not None and last.file == item[1].file
                and item[1].offset - (last.offset + last.length) <= _MAX_GAP
                and item[1].offset >= last.offset + last.length):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _read_group(storage: Storage, path: str, start: int, end: int,
                session: ReadSession | None) -> tuple[torch.Tensor, Filled]:
    """Bytes [start, end) of one file and the progress of their arrival (see readbuf)."""
    if end == start:              # empty records only: nothing to open
        filled = readbuf.Filled(0)
        filled.stopped()          # no background job
        return torch.empty(0, dtype=torch.uint8), filled
    map_private = getattr(storage, "map_private", None)
    if session is not None and map_private is not None and end > start and readbuf.mapping_supported():
        try:
            m, lead = map_private(path, start, end - start)
        except (OSError, ValueError):   # a filesystem that cannot mmap: read it instead
            pass
        else:
            return readbuf.adopt_mapping(m, lead, end - start, session)
    return readbuf.read_fresh(lambda off, view: storage.read_into(path, off, view), start, end,
                              chunked=map_private is not None)


def _verify_group(view: memoryview, group: list[tuple[int, TensorEntry]], start: int,
                  filled: Filled, where: str) -> None:
    """Check every record's hash, chunk by chunk as its bytes arrive (xxhash releases the GIL,
    so this overlaps the read)."""
    for index, entry in group:
        hasher, pos = new_hasher(), entry.offset - start
        stop = pos + entry.length
        while pos < stop:
            step = min(stop, (pos // readbuf.CHUNK + 1) * readbuf.CHUNK)
            filled.wait(step)
            hasher.update(view[pos:step])
            pos = step
        if hasher.hexdigest() != entry.hash:
            raise CorruptCheckpointError(f"hash mismatch for {_what(where, index, entry)}: "
                                         "the data is corrupt")


def _what(where: str, index: int, entry: TensorEntry) -> str:
    return f"{where} tensor #{index} ({entry.dtype}{list(entry.shape)} in {entry.file})"


def read_tensors(storage: Storage, folder: str, shard: ShardEntry, where: str,
                 verify: bool = True, session: ReadSession | None = None) -> list[torch.Tensor]:
    """All tensors of one shard, in manifest order. With a `session`, raw records of local files
    may view a private mapping of the file: call `session.finish()` after loading them."""
    out: list[torch.Tensor | None] = [None] * len(shard.tensors)
    for group in _groups(list(enumerate(shard.tensors))):
        first, last = group[0][1], group[-1][1]
        start, end = first.offset, last.offset + last.length
        path = f"{folder}/{first.file}"
        _fits_in_memory(end - start, f"bytes {start}-{end} of {storage.child_url(path)}")
        filled = None
        try:
            block, filled = _read_group(storage, path, start, end, session)
            view = byte_view(block)
            if verify:
                _verify_group(view, group, start, filled, where)
            filled.wait(end - start)
        except StorageError as exc:     # unreachable or misconfigured storage, not corrupt data
            raise translate_storage_error(exc) from exc
        except (OSError, EOFError) as exc:
            raise CorruptCheckpointError(
                f"cannot read bytes {start}-{end} of {storage.child_url(path)}: {exc}") from exc
        finally:
            if filled is not None:
                filled.cancel()
        for index, entry in group:
            what = _what(where, index, entry)
            rel = entry.offset - start
            dtype = dtype_from_name(entry.dtype, what)
            if entry.codec == "raw":
                raw = block[rel:rel + entry.length]
                # Unaligned records must be copied out; small ones are too, because some torch
                # consumers (Generator.set_state) read a tensor's storage from its start.
                if entry.nbytes and ((block.data_ptr() + rel) % 64 or entry.nbytes < _OWN_STORAGE_BELOW):
                    raw = raw.clone()
            else:
                stored, width = view[rel:rel + entry.length], codec_width(entry.codec)
                _fits_in_memory(entry.nbytes, what)
                try:      # every frame header, before the output is allocated
                    check_frames(stored, list(entry.frames), entry.nbytes, what, width)
                except ValueError as exc:
                    raise CorruptCheckpointError(f"cannot decompress {what}: {exc}") from exc
                raw = torch.empty(entry.nbytes, dtype=torch.uint8)
                try:
                    decompress_frames(stored, list(entry.frames), byte_view(raw), what, width)
                except Exception as exc:  # noqa: BLE001 - zstd raises its own ZstdError
                    raise CorruptCheckpointError(f"cannot decompress {what}: {exc}") from exc
            try:
                out[index] = raw.view(dtype).view(entry.shape) if entry.nbytes else torch.empty(
                    entry.shape, dtype=dtype)
            except (RuntimeError, TypeError, ValueError) as exc:   # what parse_manifest cannot foresee
                raise CorruptCheckpointError(f"{what} cannot be built from its bytes: {exc}") from exc
    return out  # type: ignore[return-value]


def _fits_in_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating or reading, a buffer no machine like this one could hold."""
    if nbytes > readbuf.memory_limit():
        raise CheckpointError(f"{what} needs {nbytes} bytes in one buffer, more than the "
                              f"{readbuf.memory_limit()} bytes of memory here: the manifest is damaged or "
                              "hostile, or the checkpoint needs a machine with more memory")


def load_shard(storage: Storage, folder: str, manifest: Manifest, component: str, shard_name: str,
               allow_pickle: bool = False, verify: bool = True, session: ReadSession | None = None):
    """Rebuild one component's state object from one of its shards."""
    shard = manifest.components[component].shards[shard_name]
    check_files(storage, folder, manifest, {t.file for t in shard.tensors})
    where = f"{storage.child_url(folder)} component {component!r} shard {shard_name!r}"
    tensors = read_tensors(storage, folder, shard, where, verify, session)
    return unflatten_owned(shard.tree, tensors, where, allow_pickle)


def unflatten_owned(skel, tensors: list[torch.Tensor], where: str, allow_pickle: bool):
    """unflatten(), then empty `tensors`: unflatten's recursive closure is a reference cycle that
    holds the list until the garbage collector runs, which would keep every loaded tensor (and a
    mapped file, see readbuf.ReadSession) alive after load_state_dict let go of them."""
    try:
        return unflatten(skel, tensors, where, allow_pickle)
    finally:
        tensors.clear()


VERIFY_WINDOW = 256 << 20   # bytes of a local file mapped at a time by verify_file
VERIFY_WINDOW_READ = 64 << 20   # ... read into fresh memory at a time on other backends


class _Ranges:
    """Disjoint byte ranges of one file, in file order, each hashed as its bytes pass by
    (verify_file: the records, and the segments of a node's data object)."""

    def __init__(self, ranges: list[tuple[int, int, str, str]], url: str):
        self.ranges = sorted((r for r in ranges if r[0] < r[1]), key=lambda r: r[:2])
        self.url, self.first = url, 0
        self.hashers: dict[int, Any] = {}

    def feed(self, view: memoryview, base: int, pos: int, stop: int, problems: list[str]) -> None:
        """Bytes [pos, stop) of the file, which start at `view[pos - base]`."""
        ranges, j = self.ranges, self.first
        while j < len(ranges) and ranges[j][0] < stop:
            r_start, r_end, digest, what = ranges[j]
            lo, hi = max(r_start, pos), min(r_end, stop)
            if lo < hi:
                self.hashers.setdefault(j, new_hasher()).update(view[lo - base:hi - base])
            if r_end <= stop:
                if self.hashers.pop(j).hexdigest() != digest:
                    problems.append(f"hash mismatch in {self.url} for {what}: the data is corrupt")
                self.first = j + 1     # ranges are disjoint and in file order
            j += 1


def verify_file(storage: Storage, folder: str, manifest: Manifest, name: str,
                on_bytes: Callable[[int], None] | None = None, max_problems: int = 10) -> list[str]:
    """Re-read every byte of data file `name` of a committed checkpoint once and check it against
    the manifest: the file's size, the xxh3-128 of the whole file (padding included) or, for a
    node's data object, of each of its segments, and of every record in it. Returns the problems
    found, each naming the file (empty: intact). A storage outage raises (translated) instead: it
    says nothing about the data. `on_bytes(n)` is called as bytes are checked. Reads go through
    the loader's path (local files: a private mapping populated in the background while this
    thread hashes what has arrived)."""
    url = storage.child_url(f"{folder}/{name}")
    try:
        check_files(storage, folder, manifest, {name})
    except CorruptCheckpointError as exc:
        return [str(exc)]
    entry = manifest.files[name]
    records = [(t.offset, t.offset + t.length, t.hash, f"component {key!r} shard {sid!r} "
                f"tensor #{i} ({t.dtype}{list(t.shape)})")
               for key, comp in manifest.components.items()
               for sid, shard in comp.shards.items()
               for i, t in enumerate(shard.tensors) if t.file == name]
    records += [(c.record.offset, c.record.offset + c.record.length, c.record.hash,     # SHARDED
                 f"component {key!r} tensor {'/'.join(map(str, g.path))!r} chunk "
                 f"{list(c.offsets)}+{list(c.sizes)} ({g.dtype})")
                for key, comp in manifest.components.items() if comp.sharded
                for g in comp.sharded.tensors for c in g.chunks if c.record.file == name]
    problems = [f"hash mismatch in {url} for {what}" for start, end, digest, what in records
                if start == end and new_hasher().hexdigest() != digest]
    problems += [f"hash mismatch in {url} for segment {i} (bytes {o}-{o + n})" for i, (o, n, digest)
                 in enumerate(entry.segments) if not n and new_hasher().hexdigest() != digest]
    checks = [_Ranges(records, url), _Ranges([(o, o + n, digest, f"segment {i} (bytes {o}-{o + n})")
                                              for i, (o, n, digest) in enumerate(entry.segments)], url)]
    size, path = entry.size, f"{folder}/{name}"
    whole = None if entry.segments else new_hasher()     # a node object's hash is of its segments
    window = VERIFY_WINDOW if getattr(storage, "map_private", None) is not None else VERIFY_WINDOW_READ
    session = ReadSession()
    try:
        for start in range(0, size, window):
            end = min(size, start + window)
            block, filled = _read_group(storage, path, start, end, session)
            try:
                view, pos = byte_view(block), start
                while pos < end:
                    stop = min(end, start + ((pos - start) // readbuf.CHUNK + 1) * readbuf.CHUNK)
                    filled.wait(stop - start)
                    if whole is not None:
                        whole.update(view[pos - start:stop - start])
                    for check in checks:
                        check.feed(view, start, pos, stop, problems)
                    if on_bytes is not None:
                        on_bytes(stop - pos)
                    pos = stop
                    if len(problems) >= max_problems:
                        break
                del view
            finally:
                filled.cancel()
                del block
            if len(problems) >= max_problems:
                problems.append(f"{url}: stopped after {max_problems} problems")
                return problems
    except StorageError as exc:
        raise translate_storage_error(exc) from exc
    except (OSError, EOFError) as exc:
        return problems + [f"cannot read {url}: {exc}"]
    finally:
        session.finish()
    if whole is not None and whole.hexdigest() != entry.hash:
        problems.append(f"hash mismatch in {url}: the whole file's xxh3-128 differs from the manifest's")
    if entry.segments and segments_hash(entry.segments) != entry.hash:
        problems.append(f"hash mismatch in {url}: the hash of its segments differs from the manifest's")
    return problems
