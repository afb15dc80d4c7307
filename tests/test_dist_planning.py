"""The pure pieces of multi-rank saving: who writes what, which copy a rank reloads, how the
coordinator judges announcements and replica digests, and the shared-memory hand-over."""
from __future__ import annotations

import os

import pytest
import torch

from async_ckpt.dist.messages import Announcement
from async_ckpt.dist.shm import attach_shared, sweep_dead_buffers
from async_ckpt.dist.topology import Topology
from async_ckpt.format.manifest import ComponentEntry, ShardEntry
from async_ckpt.save.plan import Planner, state_layout as layout_key
from async_ckpt.save.replicas import check_agreement, compare_full, digest, find_mismatches, tensor_paths
from async_ckpt.save.staging import BufferPool
from async_ckpt.sharing import choose_copy, replica_owners, writer_rank as shard_writer
from async_ckpt.format.tree import flatten
from async_ckpt.types import SharingPattern as SP, ValidationLevel

TWO_BY_TWO = [Topology(r, 4, r % 2, 2, r // 2) for r in range(4)]


def test_replica_owners_balance_bytes_and_alternate_nodes():
    topo = TWO_BY_TWO[0]
    owners = replica_owners([100] * 8, topo)
    assert sorted(owners) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert owners[:2] == [0, 2]                         # second tensor goes to the other node
    sizes = [1000, 10, 10, 10, 500, 500]
    owners = replica_owners(sizes, topo)
    load = {r: sum(s for s, o in zip(sizes, owners) if o == r) for r in range(4)}
    assert load[owners[0]] == 1000 and max(load.values()) == 1000      # the big one alone
    assert replica_owners([5, 5], Topology()) == [0, 0]


def test_every_rank_derives_the_same_replica_split():
    key = layout_key([("m", SP.REPLICATED, None, False, [torch.zeros(10, 10), torch.zeros(3), torch.zeros(50)])])
    written = {}
    for topo in TWO_BY_TWO:
        plan = Planner(topo).plan(key)
        written[topo.rank] = [s.index for s in plan.shards[0].slots if s.write]
        assert plan.shards[0].tree_source == (topo.rank == 0)
    indices = sorted(i for idx in written.values() for i in idx)
    assert indices == [0, 1, 2]                          # each tensor written exactly once


def test_validation_stages_everything_but_writes_a_share():
    key = layout_key([("m", SP.REPLICATED, None, True, [torch.zeros(4)] * 4)])
    plan = Planner(TWO_BY_TWO[1]).plan(key)
    assert len(plan.shards[0].slots) == 4
    assert sum(s.write for s in plan.shards[0].slots) == 1


@pytest.mark.parametrize("pattern,expected", [
    (SP.GLOBAL, [0, 0, 0, 0]), (SP.PER_RANK, [0, 1, 2, 3]), (SP.PER_NODE, [0, 0, 2, 2])])
def test_shard_writers(pattern, expected):
    assert [shard_writer(pattern, "k", t) for t in TWO_BY_TWO] == expected


def test_per_group_writer_is_a_member_and_the_same_for_all_members():
    members = (1, 3)
    writers = {shard_writer(SP.PER_GROUP, key, TWO_BY_TWO[r], members) for r in members for key in ["a"]}
    assert len(writers) == 1 and writers <= set(members)
    spread = {shard_writer(SP.PER_GROUP, f"k{i}", TWO_BY_TWO[1], members) for i in range(20)}
    assert spread == set(members)                       # different components, different writers


def _entry(pattern, shards, members=()):
    return ComponentEntry(pattern, True, "none", None,
                          {s: ShardEntry({"d": []}, (), (0,), members) for s in shards})


def choose_shard(entry, saved, topo, members):
    copies = {name: tuple(e.members) for name, e in entry.shards.items()}
    return choose_copy(SP(entry.sharing_pattern), copies, saved, topo, members)


def test_choose_shard_checks_the_topology():
    saved = {"world_size": 4, "local_world_size": 2, "num_nodes": 2}
    two = Topology(1, 2, 1, 2, 0)
    assert choose_shard(_entry("global", ["global"]), saved, two, None) == ("global", None)
    assert choose_shard(_entry("replicated", ["replicated"]), saved, two, None) == ("replicated", None)
    shard, problem = choose_shard(_entry("per_rank", ["rank0", "rank1"]), saved, two, None)
    assert shard == "rank1" and "4 rank(s)" in problem
    shard, problem = choose_shard(_entry("per_node", ["node0", "node1"]), saved, two, None)
    assert shard == "node0" and "2 node(s)" in problem
    four = TWO_BY_TWO[3]
    assert choose_shard(_entry("per_group", ["group1"], (1, 3)), saved, four, (1, 3)) == ("group1", None)
    _, problem = choose_shard(_entry("per_group", ["group1"], (1, 2, 3)), saved, four, (1, 3))
    assert "[1, 2, 3]" in problem


def _announce(patterns, layouts=None, digests=None, groups=None):
    return Announcement(patterns, layouts or {}, digests or {}, groups or {})


def test_agreement_names_the_disagreeing_component_and_ranks():
    same = {"a": ["per_rank", "none"], "b": ["replicated", "tensor"]}
    other = {"a": ["replicated", "none"], "b": ["replicated", "tensor"]}
    assert check_agreement({0: _announce(same), 1: _announce(same)}) is None
    problem = check_agreement({0: _announce(same), 1: _announce(same), 2: _announce(other)})
    assert "['a']" in problem and "ranks [0, 1]" in problem and "ranks [2]" in problem
    groups = {0: _announce(same, groups={"g": [0, 1]}), 1: _announce(same, groups={"g": [1]})}
    assert "process_group" in check_agreement(groups)


def test_digests_and_mismatches_name_tensors():
    sd = {"w": torch.arange(6.0).view(2, 3), "state": {0: {"exp_avg": torch.ones(3, dtype=torch.bfloat16)}}}
    tree, tensors = flatten(sd, "m")
    assert tensor_paths(tree) == {0: "w", 1: "state/0/exp_avg"}
    shard = Planner(Topology()).plan(layout_key([("m", SP.REPLICATED, None, True, tensors)])).shards[0]
    good = digest(shard, tensors, tree, ValidationLevel.TENSOR)
    bad_tensors = [tensors[0], tensors[1].clone()]
    bad_tensors[1][2] += 1
    bad = digest(shard, bad_tensors, tree, ValidationLevel.TENSOR)
    assert good["tensors"][0] == bad["tensors"][0] and good["tensors"][1] != bad["tensors"][1]
    patterns = {"m": ["replicated", "tensor"]}
    announces = {r: _announce(patterns, digests={"m": bad if r == 2 else good}) for r in range(3)}
    found = find_mismatches(announces, {"m": [0, 2]})
    assert found == [{"component": "m", "level": "tensor", "tensor": 1, "owner": 2, "ranks": [2], "agree": [0, 1]}]
    quick = digest(shard, tensors, tree, ValidationLevel.QUICK)
    assert quick != digest(shard, bad_tensors, tree, ValidationLevel.QUICK)
    assert compare_full(bad_tensors[1], tensors[1]) == {"max_abs_diff": 1.0, "differing": 1}


def test_shared_buffers_are_handed_over_by_name_and_never_left_behind():
    pool = BufferPool(shared=True)
    buf = pool.acquire(1000)
    buf.tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert os.path.exists(buf.name)
    mapped = attach_shared(buf.name, buf.capacity)
    assert not os.path.exists(buf.name)                 # unlinked once mapped: no leak on a crash
    assert mapped[:4].tolist() == [1, 2, 3, 4]
    buf.tensor[0] = 9
    assert mapped[0] == 9                               # the same memory, not a copy
    with pytest.raises(ValueError):
        attach_shared("/etc/passwd", 10)
    other = pool.acquire(10)
    pool.release(other)
    pool.close()
    assert not os.path.exists(other.name)
    dead = os.path.join(os.path.dirname(other.name), "async_ckpt-999999999-1-deadbeef")
    open(dead, "wb").close()
    sweep_dead_buffers()
    assert not os.path.exists(dead)


def test_a_node_shared_read_survives_the_store_host_leaving_first(tmp_path):
    """load() has no collective: rank 0 (which may host the Store) can return and exit before a
    peer acknowledges the shared buffer. The peer's copy is complete by then, so the failed
    acknowledgement must not fail its load; with the Store up, the last reader removes the buffer."""
    from async_ckpt.load.node_shared import _acknowledge

    class Gone:
        def increment(self, seq, name, by=1):
            raise RuntimeError("Connection was likely closed. Did the remote server shutdown?")

    class Up:
        count, deleted = 0, []

        def increment(self, seq, name, by=1):
            self.count += by
            return self.count

        def delete(self, seq, names):
            self.deleted.extend(names)

    shm = tmp_path / "buffer"
    shm.write_bytes(b"x")
    topo = Topology(rank=1, world_size=2, local_rank=1, local_world_size=2, node=0)
    _acknowledge(Gone(), "load1", "shared/0", topo, str(shm))       # does not raise
    assert shm.exists()                                               # left to the sweep
    up = Up()
    _acknowledge(up, "load1", "shared/0", topo, str(shm))
    assert not shm.exists() and up.deleted == ["shared/0", "ack/0"]
