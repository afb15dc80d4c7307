"""The S3 phase of `bench.scale` (``--s3 moto|seaweedfs``): S3 requests per save, per first save
(the write probe) and per listing, counted on a real loopback server with the same simulated
saves as the Store rows (their data objects real but tiny)."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

from async_ckpt.dist.messages import Outcome
from async_ckpt.dist.topology import Topology
from async_ckpt.format.names import step_dir
from async_ckpt.options import CheckpointOptions
from async_ckpt.save.commit import Committer
from async_ckpt.save.coordinator import Coordinator
from async_ckpt.types import SharingPattern

from .scale import _Writer, build_world
from .scale_workers import PER_NODE, announce
from .scale_store import Tally, link_for


def run_s3(server_name: str, master: Any, worlds: tuple[int, ...] = (8, 16), tensors: int = 100) -> dict:
    """S3 requests per save and per first save, counted on a real loopback server."""
    from async_ckpt.storage.s3 import S3Storage
    from async_ckpt.storage import open_storage
    from async_ckpt.storage.testing import servers

    server = servers.start(server_name)
    out: dict[str, Any] = {"server": server_name, "rows": []}
    try:
        for world in worlds:
            root = server.fresh_root()
            storage = open_storage(root, server.storage_options())
            assert isinstance(storage, S3Storage)
            counts: Counter[str] = Counter()
            storage.call = _counted(storage.call, counts)  # type: ignore[method-assign]
            row: dict[str, Any] = {"world": world, "tensors": tensors, "saves": []}
            probe = probe_requests(storage, world, counts)
            row["first_save_probe"] = probe
            for seq in (1, 2, 3):
                counts.clear()
                s3_save(master, storage, world, tensors, seq)
                row["saves"].append(dict(counts))
            counts.clear()
            listing_requests(storage)
            row["listing"] = dict(counts)
            out["rows"].append(row)
    finally:
        server.stop()
    return out


def _counted(real_call: Any, counts: Counter) -> Any:
    async def counted(method: str, path: str, **kwargs: Any) -> Any:
        counts[method] += 1
        return await real_call(method, path, **kwargs)
    return counted


def probe_requests(storage: Any, world: int, counts: Counter) -> dict:
    """The write probe of a first save: which ranks run it is the checkpointer's `_start` rule."""
    from async_ckpt import checkpointer
    local = min(PER_NODE, world)
    rule = getattr(checkpointer, "probes_writability", None)
    counts.clear()
    probing = 0
    for r in range(world):
        topo = Topology(r, world, r % local, local, r // local)
        if rule is None or rule(topo):         # before: every rank probed
            storage.check_writable()
            probing += 1
        else:
            storage.check_root()
    return {"ranks_probing": probing, "requests": sum(counts.values()), "ops": dict(counts)}


def listing_requests(storage: Any) -> None:
    """What latest_step() and list_checkpoints() ask the storage (as the checkpointer does)."""
    from async_ckpt.format.names import committed_steps, read_manifest as read
    from async_ckpt.load.restore import info_of
    from async_ckpt.save import commit
    listed = getattr(commit, "committed_in", committed_steps)   # older trees: committed_in there
    listed(storage)                                   # latest_step()
    for step in listed(storage):                      # list_checkpoints()
        info_of(storage, read(storage, step_dir(step), step, fragments=False), step_dir(step))


def s3_save(master: Any, storage: Any, world: int, tensors: int, seq: int) -> None:
    pattern = SharingPattern.PER_RANK
    step = seq * 10
    ns = f"bench/s3/{world}/{os.urandom(3).hex()}"
    link = link_for(master, ns, Tally())
    w = build_world(world, tensors, pattern, step, seq)
    options = CheckpointOptions.from_keywords({}, keep_last=2)
    committer = Committer(storage, options, 0, w.topos[0].num_nodes > 1, lambda: {step})
    coordinator = Coordinator(storage, w.topos[0], link, committer, {"bench": "scale"})
    own = None
    for node in range(w.topos[0].num_nodes):
        ranks = list(w.topos[0].node_ranks(node))
        for r in ranks[1:]:
            link.post(seq, f"job/{r}", w.jobs[r].descriptor(r))
        for r in ranks:
            link.post(seq, f"vh/{r}", announce(w.jobs[r], w.topos[r], link))
        report = _Writer(w.topos[ranks[0]], link, storage, real_objects=True).write(w.jobs[ranks[0]])
        if node == 0:
            own = report
        else:
            link.post(seq, f"node/{node}", report)
    coordinator.run(w.jobs[0], own)  # type: ignore[arg-type]
    if not link.get(seq, "outcome", Outcome).ok:
        raise RuntimeError("the S3 save failed")
