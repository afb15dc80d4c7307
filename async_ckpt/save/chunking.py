"""SHARDED components at save time: which box of which global tensor each local tensor is, and
whether this rank writes it.

Called on the training thread by ``AsyncCheckpointer.save`` for every SHARDED component, after
``flatten``: a DTensor leaf becomes its local tensor plus a `ChunkMeta` (its key path in the
state, the global shape, this rank's offsets in it, the mesh and placements it came from); a
plain tensor leaf is the whole tensor, replicated. Who writes a chunk is `sharing.chunk_writer`'s
to say, from the ranks that hold it alike (computed from the mesh, no collective). Everything
here is a pure function of the state and the topology, so every rank derives the same writers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ..dist.topology import Topology
from ..errors import InvalidArgumentError
from ..format.tree import TensorLeaf, leaves
from ..sharing import chunk_writer, replica_owners

# A REPLICATED tensor larger than this and than its fair share of the component (bytes / world)
# is split into row blocks written by different ranks (`split_replicated`), so one giant tensor
# is not carried by one rank.
SPLIT_MIN_BYTES = 16 << 20


@dataclass(frozen=True)
class ChunkMeta:
    """One local tensor of a SHARDED component as a box of its global tensor."""
    path: tuple[Any, ...]          # key path in the state
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    write: bool                    # this rank writes the chunk
    replicated: bool               # other ranks hold it too (digested when validated)
    layout: str = ""               # JSON: mesh shape, dimension names, placements (tools only)

    @property
    def ident(self) -> str:
        """The chunk's identity across ranks: its path and offsets."""
        return json.dumps([list(self.path), list(self.offsets)], separators=(",", ":"))


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _placements_of(t: Any, component: str, path: str) -> tuple[Any, ...]:
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.placement_types import _StridedShard
    for p in t.placements:
        if isinstance(p, Partial):
            raise InvalidArgumentError(
                f"component {component!r}: DTensor at {path!r} has a Partial placement (pending "
                "reduction); redistribute it to Shard/Replicate placements before saving")
        if isinstance(p, _StridedShard) and p.split_factor != 1:
            raise InvalidArgumentError(
                f"component {component!r}: DTensor at {path!r} is strided-sharded ({p}), as 2-D "
                "FSDP2 + tensor parallel makes it; its local shard is not one box of the global "
                "tensor, which SHARDED stores. Save it with full_state_dict, or one FSDP2 mesh")
    return tuple(t.placements)


def chunk_layout(tensors: list[Any], tree: Any, component: str, topo: Topology,
                 replicas: tuple[int, ...] | None) -> tuple[list[torch.Tensor], tuple[ChunkMeta, ...]]:
    """The local tensors to stage and their chunk metas, in the order of `tensors` (flatten's)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    paths: dict[int, tuple[Any, ...]] = {}
    for path, leaf in leaves(tree, component):
        if isinstance(leaf, TensorLeaf):
            paths.setdefault(leaf.index, path)
    everyone = tuple(replicas) if replicas else tuple(range(topo.world_size))
    local, metas = [], []
    for i, t in enumerate(tensors):
        path = paths[i]
        where = "/".join(str(k) for k in path)
        if not is_dtensor(t):
            meta = ChunkMeta(path, tuple(t.shape), (0,) * t.dim(), False, len(everyone) > 1)
            local.append(t)
            metas.append(_decided(meta, everyone, replicas, topo.rank))
            continue
        placements = _placements_of(t, component, where)
        mesh = t.device_mesh
        shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
        mine = t.to_local().detach()
        if tuple(mine.shape) != tuple(shape):
            raise InvalidArgumentError(
                f"component {component!r}: DTensor at {where!r} has a local shard of shape "
                f"{list(mine.shape)}, but its placements {placements} give {list(shape)}; SHARDED "
                "needs local shards that match their placements")
        coord = mesh.get_coordinate()
        if coord is None:
            raise InvalidArgumentError(f"component {component!r}: this rank is not in the mesh "
                                       f"of the DTensor at {where!r}")
        select = tuple(coord[d] if p.is_shard() else slice(None) for d, p in enumerate(placements))
        holders = tuple(sorted(int(r) for r in mesh.mesh[select].flatten().tolist()))
        layout = json.dumps({"mesh": list(mesh.mesh.shape), "dims": list(mesh.mesh_dim_names or ()),
                             "placements": [str(p) for p in placements]}, separators=(",", ":"))
        meta = ChunkMeta(path, tuple(t.shape), tuple(int(o) for o in offsets), False,
                         len(holders) > 1 or bool(replicas and len(replicas) > 1), layout)
        local.append(mine)
        metas.append(_decided(meta, holders, replicas, topo.rank))
    return local, tuple(metas)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def needs_split(tensors: list[torch.Tensor], topo: Topology) -> bool:
    """Whether a REPLICATED component has a tensor too large to be written by one rank."""
    if topo.world_size == 1:
        return False
    fair = sum(_nbytes(t) for t in tensors) / topo.world_size
    return any(t.dim() and t.shape[0] > 1 and _nbytes(t) >= SPLIT_MIN_BYTES and _nbytes(t) > fair
               for t in tensors)


def split_replicated(tensors: list[torch.Tensor], tree: Any, component: str, topo: Topology
                     ) -> tuple[list[torch.Tensor], tuple[ChunkMeta, ...]]:
    """A REPLICATED component as chunks: tensors above their fair share split into row blocks
    (one per rank at most), the rest whole; every chunk written by one rank, balanced over ranks
    and nodes like whole tensors (`sharing.replica_owners`), the same on every rank."""
    paths: dict[int, tuple[Any, ...]] = {}
    for path, leaf in leaves(tree, component):
        if isinstance(leaf, TensorLeaf):
            paths.setdefault(leaf.index, path)
    fair = sum(_nbytes(t) for t in tensors) / topo.world_size
    local: list[torch.Tensor] = []
    boxes: list[tuple[tuple[Any, ...], tuple[int, ...], tuple[int, ...]]] = []
    for i, t in enumerate(tensors):
        rows = t.shape[0] if t.dim() else 0
        if rows > 1 and _nbytes(t) >= SPLIT_MIN_BYTES and _nbytes(t) > fair:
            blocks = min(topo.world_size, rows)
            start = 0
            for b in range(blocks):
                n = rows // blocks + (1 if b < rows % blocks else 0)
                local.append(t.narrow(0, start, n))
                boxes.append((paths[i], tuple(t.shape), (start,) + (0,) * (t.dim() - 1)))
                start += n
        else:
            local.append(t)
            boxes.append((paths[i], tuple(t.shape), (0,) * t.dim()))
    owners = replica_owners([_nbytes(t) for t in local], topo)
    metas = tuple(ChunkMeta(path, shape, offsets, owner == topo.rank, True)
                  for (path, shape, offsets), owner in zip(boxes, owners, strict=True))
    return local, metas


def _decided(meta: ChunkMeta, holders: tuple[int, ...], replicas: tuple[int, ...] | None,
             rank: int) -> ChunkMeta:
    write = chunk_writer(meta.ident, holders, replicas, rank)
    return ChunkMeta(meta.path, meta.global_shape, meta.offsets, write, meta.replicated, meta.layout)
