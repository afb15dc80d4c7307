"""Unit tests of the save path's roles, each driven on its own over an in-process Store: the
Store link, the typed messages, the node writer, the coordinator and the rank worker.

End-to-end tests (test_distributed.py, test_semantics_saving.py) run the same roles together on
real process groups; these pin each role's contract: what it reads, what it posts, and how it
fails within its deadline."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from async_ckpt.dist import messages as msg
from async_ckpt.dist.link import LinkTimeout, RemoteFailure, StoreLink
from async_ckpt.dist.topology import Topology
from async_ckpt.errors import SaveFailedError
from async_ckpt.format.names import manifest_path, read_manifest, step_dir
from async_ckpt.format.tree import flatten
from async_ckpt.handle import Settlement
from async_ckpt.options import CheckpointOptions
from async_ckpt.save.commit import Committer
from async_ckpt.save.coordinator import Coordinator
from async_ckpt.save.datafile import DataFileStreamer
from async_ckpt.save.job import ComponentSpec, SaveJob
from async_ckpt.save.node_writer import NodeWriter
from async_ckpt.save.plan import Planner, state_layout
from async_ckpt.save.rank_worker import RankWorker
from async_ckpt.save.staging import BufferPool, stage
from async_ckpt.sharing import stages_every_replica
from async_ckpt.storage import LocalStorage
from async_ckpt.types import SharingPattern, ValidationLevel

ONE = Topology()


def make_job(topo: Topology, state: dict, step: int = 1, seq: int = 1,
             pattern: SharingPattern = SharingPattern.GLOBAL,
             level: ValidationLevel = ValidationLevel.NONE) -> SaveJob:
    """A staged job for one component "c", exactly as AsyncCheckpointer.save builds it."""
    tree, tensors = flatten(state, "c")
    layout = state_layout([("c", pattern, None, stages_every_replica(pattern, level, topo), tensors)])
    plan = Planner(topo).plan(layout)
    buffer = BufferPool(shared=not topo.is_node_writer).acquire(plan.buffer_nbytes)
    stage(plan, [tensors], buffer)
    shapes = ({"c": tuple((str(t.dtype), tuple(t.shape)) for t in tensors)}
              if pattern is SharingPattern.REPLICATED else {})
    return SaveJob(step, seq, plan, buffer, [tree], [ComponentSpec("c", True, level.value, None)], {},
                   Settlement(step), time.perf_counter(), replicated_shapes=shapes)


@pytest.fixture
def link() -> StoreLink:
    return StoreLink.in_process("t", timeout_s=2.0)


# -- messages and the link ------------------------------------------------------------------------
def test_every_message_round_trips_through_its_json():
    tensor = msg.WrittenTensor(3, "bfloat16", (2, 3), "f.bin", 64, 12, 12, "ab" * 16, (5, 7), "zstd")
    shard = msg.ShardDescriptor("c", "global", "global", 4, True, {"d": [["w", {"t": 0}]]}, True,
                                "tensor", {"a": 1}, (0, 2), (msg.Slot(0, "float32", (4,), 16, 0),))
    examples = [
        msg.JobDescriptor(1, 7, "/dev/shm/x", 128, (shard,)), msg.Begun(1),
        msg.NodeReport(1, 2, (msg.WrittenFile("f.bin", 99, "cd" * 16),),
                       (msg.WrittenShard(2, dataclasses.replace(shard, slots=()), (tensor,)),), 0.5),
        msg.NodeReport(1, 2, causes={2: "boom", 3: "late"}),
        msg.Announcement({"c": ("replicated", "quick")}, {"c": (("float32", (2, 2)),)},
                         {"c": {"quick": "00"}}, {"g": (0, 1)}),
        msg.RankError(3, "x"), msg.FullRequest((msg.FullItem("c", 1, ((0, 0), (1, 2)), tensor),)),
        msg.FullAnswer((msg.FullResult("c", 1, 2, None, 4), msg.FullResult("c", 2, 2, 0.5, 1))),
        msg.Outcome(True, info=msg.CommittedInfo("u", 1, 2, "now", {"t": 1.5}, {"loss": "nan"})),
        msg.Outcome(False, "bad", {0: "x"}, True),
        msg.SharedCopies("/dev/shm/y", 10, (msg.SharedCopy("c", "global", (msg.SharedTensor(0, "int64", (1,), 8),)),)),
        msg.SharedCopies(error="unreadable"),
    ]
    for message in examples:
        assert msg.decode(type(message), msg.encode(message)) == message
    with pytest.raises(ValueError, match="malformed Outcome"):
        msg.decode(msg.Outcome, '{"message": "no ok field"}')
    with pytest.raises(TypeError):
        msg.encode({"not": "a message"})


def test_gather_returns_typed_messages_and_stops_at_a_posted_error(link):
    link.post(1, "node/1", msg.NodeReport(1, 2, write_s=0.25))
    got = link.gather(1, {1: "node/1"}, msg.NodeReport, "node(s)", range(4))
    assert got == {1: msg.NodeReport(1, 2, write_s=0.25)}
    link.post_error(2, 3, "rank 3 ran out of memory")
    start = time.monotonic()
    with pytest.raises(RemoteFailure) as info:
        link.gather(2, {1: "node/1"}, msg.NodeReport, "node(s)", range(4))
    assert info.value.causes == {3: "rank 3 ran out of memory"} and time.monotonic() - start < 1


def test_gather_names_what_is_missing_at_its_deadline(link):
    start = time.monotonic()
    with pytest.raises(LinkTimeout) as info:
        link.gather(1, {2: "vh/2", 5: "vh/5"}, msg.Announcement, "rank(s)", range(8),
                    deadline=time.monotonic() + 0.3)
    assert info.value.missing == [2, 5] and "rank(s) 2, 5 did not answer" in str(info.value)
    assert 0.3 <= time.monotonic() - start < 2


def test_gather_notices_a_peer_whose_heartbeat_stopped():
    link = StoreLink.in_process("t", timeout_s=0.5)       # liveness_s = min(timeout_s, 30)
    link.beat(1)
    start = time.monotonic()
    with pytest.raises(LinkTimeout, match="rank 1 stopped answering"):
        link.gather(1, {1: "node/1"}, msg.NodeReport, "node(s)", range(2), alive={1: 1}, forever=True)
    assert time.monotonic() - start < 3


def test_a_failed_outcome_stops_gathers():
    link = StoreLink.in_process("t", timeout_s=5.0)
    link.post(1, "outcome", msg.Outcome(False, "coordinator gave up", {0: "disk full"}))
    with pytest.raises(RemoteFailure, match="disk full"):
        link.gather(1, {1: "full/1"}, msg.FullAnswer, "rank(s)", range(2))


# -- the node writer ------------------------------------------------------------------------------
def _node_writer(tmp_path, link, topo=ONE, coordinator=None) -> tuple[NodeWriter, LocalStorage]:
    storage = LocalStorage(str(tmp_path))
    return NodeWriter(storage, topo, link, DataFileStreamer(None), False, coordinator), storage


def test_node_writer_writes_a_file_per_rank_and_reports_its_records(tmp_path, link):
    writer, storage = _node_writer(tmp_path, link)
    state = {"w": torch.arange(10.0), "i": torch.arange(3), "meta": {"epoch": 2}}
    job = make_job(ONE, state)
    try:
        report = writer.write(job)
    finally:
        writer.stop()
    assert not report.failed and report.node == 0 and report.rank == 0
    (file,) = report.files
    assert storage.size(f"{step_dir(1)}/{file.name}") == file.size
    (shard,) = report.shards
    assert shard.shard.component == "c" and shard.shard.tree_source and shard.shard.slots == ()
    assert [t.index for t in shard.tensors] == [0, 1] and {t.file for t in shard.tensors} == {file.name}
    raw = open(tmp_path / step_dir(1) / file.name, "rb").read()
    first = shard.tensors[0]
    assert torch.equal(torch.frombuffer(bytearray(raw[first.offset:first.offset + first.nbytes]),
                                        dtype=torch.float32), state["w"])


def test_node_writer_posts_its_report_when_it_is_not_the_coordinator(tmp_path, link):
    writer, _ = _node_writer(tmp_path, link)
    job = make_job(ONE, {"w": torch.ones(4)}, seq=3)
    writer.submit(job)
    assert job.written.wait(10)
    writer.stop()
    report = link.get(3, "node/0", msg.NodeReport)
    assert not report.failed and len(report.files) == 1


def test_node_writer_reports_a_storage_failure_instead_of_raising(tmp_path, link):
    writer, storage = _node_writer(tmp_path, link)

    def full(path):
        raise OSError(28, "No space left on device (injected)")
    storage.open_writer = full
    job = make_job(ONE, {"w": torch.ones(4)})
    report = writer.write(job)
    writer.stop()
    assert report.failed and "No space left" in report.causes[0]
    assert isinstance(job.local_errors[0], OSError)


def test_node_writer_names_a_local_rank_that_never_handed_over(tmp_path, link):
    topo = Topology(rank=0, world_size=2, local_rank=0, local_world_size=2, node=0)
    link.beat(1)                                        # alive once, then silent: it hangs
    writer, _ = _node_writer(tmp_path, link, topo)
    start = time.monotonic()
    report = writer.write(make_job(topo, {"w": torch.ones(4)}, pattern=SharingPattern.PER_RANK))
    writer.stop()
    assert report.failed and 1 in report.causes and "hand over" in report.causes[1]
    assert time.monotonic() - start < 10


# -- the coordinator ------------------------------------------------------------------------------
def _coordinator(tmp_path, link, topo=ONE, **options) -> tuple[Coordinator, LocalStorage]:
    storage = LocalStorage(str(tmp_path))
    committer = Committer(storage, CheckpointOptions(**options), topo.rank, topo.num_nodes > 1, set)
    return Coordinator(storage, topo, link, committer, {"async_ckpt": "test"}), storage


def _announce(job: SaveJob) -> msg.Announcement:
    return msg.Announcement({"c": (job.plan.shards[0].pattern.value, job.components[0].validation_level)},
                            job.replicated_shapes, {}, {})


def test_coordinator_commits_publishes_and_runs_retention(tmp_path, link):
    coordinator, storage = _coordinator(tmp_path, link, keep_last=1)
    writer, _ = _node_writer(tmp_path, link)
    for step in (1, 2):
        job = make_job(ONE, {"w": torch.full((8,), float(step))}, step=step, seq=step)
        link.post(step, "vh/0", _announce(job))
        coordinator.run(job, writer.write(job))
        assert job.published.is_set() and job.retained.is_set()
        outcome = link.get(step, "outcome", msg.Outcome)
        assert outcome.ok and outcome.info is not None and outcome.info.url.endswith(step_dir(step))
        manifest = read_manifest(storage, step_dir(step), step)
        assert manifest.components["c"].shards["global"].owners == (0,)
        assert manifest.timings["write_s"] >= 0 and "total_s" in manifest.timings
    writer.stop()
    assert not storage.exists(manifest_path(1)) and storage.list_dir("") == [step_dir(2)]


def test_coordinator_refuses_ranks_that_disagree_and_removes_what_was_written(tmp_path, link):
    two = Topology(rank=0, world_size=2, local_rank=0, local_world_size=2, node=0)   # one node
    coordinator, storage = _coordinator(tmp_path, link, two)
    writer, _ = _node_writer(tmp_path, link)
    job = make_job(ONE, {"w": torch.ones(4)})
    link.post(1, "vh/0", _announce(job))
    link.post(1, "vh/1", msg.Announcement({"c": ("per_rank", "none")}, {}, {}, {}))
    coordinator.run(job, writer.write(job))
    writer.stop()
    outcome = link.get(1, "outcome", msg.Outcome)
    assert not outcome.ok and "ranks disagree" in outcome.message
    assert not storage.exists(step_dir(1)), "a failed save's files were left behind"


def test_coordinator_fails_the_save_when_a_node_reports_an_error(tmp_path, link):
    topo = Topology(rank=0, world_size=2, local_rank=0, local_world_size=1, node=0)
    coordinator, storage = _coordinator(tmp_path, link, topo)
    link.post(1, "begun/1", msg.Begun(1))
    link.post(1, "node/1", msg.NodeReport(1, 1, causes={1: "OSError: disk full on node 1"}))
    own = msg.NodeReport(0, 0)
    job = make_job(topo, {"w": torch.ones(4)}, pattern=SharingPattern.PER_RANK)
    coordinator.run(job, own)
    outcome = link.get(1, "outcome", msg.Outcome)
    assert not outcome.ok and outcome.causes == {1: "OSError: disk full on node 1"}
    assert not storage.exists(manifest_path(1))


def test_coordinator_names_a_node_that_never_starts_the_save(tmp_path):
    link = StoreLink.in_process("t", timeout_s=0.5)
    topo = Topology(rank=0, world_size=2, local_rank=0, local_world_size=1, node=0)
    coordinator, _ = _coordinator(tmp_path, link, topo)
    link.beat(1)
    coordinator.run(make_job(topo, {"w": torch.ones(4)}), msg.NodeReport(0, 0))
    outcome = link.get(1, "outcome", msg.Outcome)
    assert not outcome.ok and list(outcome.causes) == [1]


# -- the rank worker ------------------------------------------------------------------------------
def test_rank_worker_announces_and_resolves_with_the_published_outcome(tmp_path, link):
    topo = Topology(rank=1, world_size=2, local_rank=0, local_world_size=1, node=1)
    pool = BufferPool()
    worker = RankWorker(link, topo, LocalStorage(str(tmp_path)), pool)
    job = make_job(topo, {"w": torch.ones(4)}, pattern=SharingPattern.REPLICATED, level=ValidationLevel.TENSOR)
    job.written.set()                     # no node writer in this test
    link.post(1, "vh/0", msg.Announcement({}, {}, {}, {}))   # rank 0 entered the save

    def coordinator() -> None:
        announce = link.gather(1, {1: "vh/1"}, msg.Announcement, "rank(s)", range(2))[1]
        assert announce.patterns == {"c": ("replicated", "tensor")} and "tensors" in announce.digests["c"]
        info = msg.CommittedInfo("url", 16, 16, "now", {"write_s": 0.1}, {"loss": 0.5})
        link.post(1, "outcome", msg.Outcome(True, info=info))
    thread = threading.Thread(target=coordinator)
    thread.start()
    link.beat(0)
    worker.submit(job)
    info = job.settlement.handle.wait(10)
    thread.join()
    worker.stop()
    assert info.url == "url" and info.metrics == {"loss": 0.5} and info.timings["write_s"] == 0.1
    assert job.settlement.settled and pool._free == [job.buffer]      # the buffer went back


def test_rank_worker_fails_the_handle_with_every_rank_cause(tmp_path, link):
    topo = Topology(rank=1, world_size=2, local_rank=0, local_world_size=1, node=1)
    worker = RankWorker(link, topo, LocalStorage(str(tmp_path)), BufferPool())
    job = make_job(topo, {"w": torch.ones(4)})
    job.written.set()
    link.post(1, "outcome", msg.Outcome(False, "rank 0: OSError: disk full", {0: "OSError: disk full"}))
    worker.submit(job)
    with pytest.raises(SaveFailedError, match="nothing was committed") as info:
        job.settlement.handle.wait(10)
    worker.stop()
    assert info.value.causes == {0: "OSError: disk full"} and job.settlement.settled


def test_rank_worker_gives_up_when_the_coordinator_never_starts(tmp_path):
    link = StoreLink.in_process("t", timeout_s=0.5)
    topo = Topology(rank=1, world_size=2, local_rank=0, local_world_size=1, node=1)
    worker = RankWorker(link, topo, LocalStorage(str(tmp_path)), BufferPool())
    job = make_job(topo, {"w": torch.ones(4)})
    job.written.set()
    start = time.monotonic()
    worker.submit(job)
    with pytest.raises(SaveFailedError, match="rank 0 did not start saving step 1"):
        job.settlement.handle.wait(10)
    worker.stop()
    assert time.monotonic() - start < 5
