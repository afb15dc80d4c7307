"""Reading a committed checkpoint back: verified byte ranges -> tensors -> nested state.

Each rank reads only the shards it needs. Adjacent raw records are read with one ranged read into
one aligned buffer and viewed in place (no second copy); every record's hash is checked before its
bytes are used, and zstd records are verified before they are decompressed (the pieces of one
record decompress in parallel, see codec.decompress_frames).
"""
from __future__ import annotations

import torch

from .codec import byte_view, codec_width, decompress_frames, hash_bytes
from .errors import CorruptCheckpointError
from .manifest import MANIFEST_NAME, Manifest, ShardEntry, TensorEntry, parse_manifest
from .storage import Storage
from .tree import dtype_from_name, unflatten

_MAX_GAP = 1 << 20   # read through gaps up to this size rather than issue another request
_OWN_STORAGE_BELOW = 1 << 16   # records smaller than this get their own storage (cheap)


def read_manifest(storage: Storage, folder: str, step: int | None = None) -> Manifest:
    path = f"{folder}/{MANIFEST_NAME}"
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {storage.child_url(path)}: {exc}") from exc
    return parse_manifest(raw, storage.child_url(path), step)


def check_files(storage: Storage, folder: str, manifest: Manifest, names: set[str]) -> None:
    """Each needed data file exists inside the folder with exactly the size the manifest says."""
    for name in sorted(names):
        url = storage.child_url(f"{folder}/{name}")
        resolves_inside = getattr(storage, "resolves_inside", None)
        if resolves_inside is not None and not resolves_inside(folder, name):
            raise CorruptCheckpointError(f"{url} resolves outside its checkpoint folder; refusing it")
        try:
            size = storage.size(f"{folder}/{name}")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"data file {url} listed in the manifest is missing") from None
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


def read_tensors(storage: Storage, folder: str, shard: ShardEntry, where: str,
                 verify: bool = True) -> list[torch.Tensor]:
    """All tensors of one shard, in manifest order."""
    out: list[torch.Tensor | None] = [None] * len(shard.tensors)
    for group in _groups(list(enumerate(shard.tensors))):
        first, last = group[0][1], group[-1][1]
        start, end = first.offset, last.offset + last.length
        block = torch.empty(end - start, dtype=torch.uint8)
        path = f"{folder}/{first.file}"
        try:
            storage.read_into(path, start, byte_view(block))
        except (OSError, EOFError) as exc:
            raise CorruptCheckpointError(
                f"cannot read bytes {start}-{end} of {storage.child_url(path)}: {exc}") from exc
        view = byte_view(block)
        for index, entry in group:
            what = f"{where} tensor #{index} ({entry.dtype}{list(entry.shape)} in {entry.file})"
            rel = entry.offset - start
            stored = view[rel:rel + entry.length]
            if verify and hash_bytes(stored) != entry.hash:
                raise CorruptCheckpointError(f"hash mismatch for {what}: the data is corrupt")
            dtype = dtype_from_name(entry.dtype, what)
            if entry.codec == "raw":
                raw = block[rel:rel + entry.length]
                # Unaligned records must be copied out; small ones are too, because some torch
                # consumers (Generator.set_state) read a tensor's storage from its start.
                if entry.nbytes and (rel % 64 or entry.nbytes < _OWN_STORAGE_BELOW):
                    raw = raw.clone()
            else:
                raw = torch.empty(entry.nbytes, dtype=torch.uint8)
                try:
                    decompress_frames(stored, list(entry.frames), byte_view(raw), what,
                                      codec_width(entry.codec))
                except Exception as exc:  # noqa: BLE001 - zstd raises its own ZstdError
                    raise CorruptCheckpointError(f"cannot decompress {what}: {exc}") from exc
            out[index] = raw.view(dtype).view(entry.shape) if entry.nbytes else torch.empty(
                entry.shape, dtype=dtype)
    return out  # type: ignore[return-value]


def load_shard(storage: Storage, folder: str, manifest: Manifest, component: str, shard_name: str,
               allow_pickle: bool = False, verify: bool = True):
    """Rebuild one component's state object from one of its shards."""
    shard = manifest.components[component].shards[shard_name]
    check_files(storage, folder, manifest, {t.file for t in shard.tensors})
    where = f"{storage.child_url(folder)} component {component!r} shard {shard_name!r}"
    tensors = read_tensors(storage, folder, shard, where, verify)
    return unflatten(shard.tree, tensors, where, allow_pickle)
