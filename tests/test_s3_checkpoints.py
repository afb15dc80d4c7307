"""Checkpoints on real S3 servers (SeaweedFS, and moto for AWS semantics): round trip, latest,
retention, corruption with and without zstd, a tensor that needs several multipart parts, and
manifest-only visibility. Damage is done with a plain boto3 client, behind async_ckpt's back."""
from __future__ import annotations

import pytest
import torch

from async_ckpt import AsyncCheckpointer, CheckpointNotFoundError, CorruptCheckpointError, StateComponent
from support.compare import assert_same
from support.corruption import G, a_module, b_state
from support.stateful import Box
from support.s3 import Remote

COMPRESSION = [None, "zstd"]


def checkpointer(remote: Remote, a, b, **kwargs) -> AsyncCheckpointer:
    return AsyncCheckpointer(remote.url, [StateComponent("a", a, G), StateComponent("b", b, G)],
                             storage_options=remote.options(), **kwargs)


def save(remote: Remote, steps, **kwargs) -> None:
    for step in steps:
        with checkpointer(remote, a_module(step), Box(b_state(step)), **kwargs) as ck:
            ck.save(step, metrics={"loss": 1.0 / (step + 1)}).wait()


def fresh(remote: Remote):
    a = torch.nn.Linear(16, 8)
    with torch.no_grad():
        a.weight.zero_()
        a.bias.zero_()
    b = Box({"sentinel": torch.zeros(1)})
    return checkpointer(remote, a, b), a, b


def load_exact(remote: Remote, step: int | None, want_step: int) -> None:
    ck, a, b = fresh(remote)
    info = ck.load(step)
    assert info is not None and info.step == want_step
    assert info.url == f"{remote.url}/step-{want_step:010d}"
    assert_same(dict(a.state_dict()), dict(a_module(want_step).state_dict()))
    assert_same(b.loaded, b_state(want_step))


def load_fails(remote: Remote, step: int, *words: str) -> None:
    ck, a, b = fresh(remote)
    with pytest.raises(CorruptCheckpointError) as info:
        ck.load(step)
    for word in words:
        assert word in str(info.value)
    assert b.loads == 0 and not a.weight.any(), "a failed load changed the components"


@pytest.fixture
def remote(any_s3) -> Remote:
    return Remote(any_s3)


@pytest.mark.parametrize("compression", COMPRESSION)
def test_round_trip_and_latest(remote, compression):
    ck, _, _ = fresh(remote)
    assert ck.latest_step() is None and ck.load() is None and ck.list_checkpoints() == []
    save(remote, (1, 2), compression=compression)
    load_exact(remote, 1, 1)
    load_exact(remote, None, 2)
    infos = ck.list_checkpoints()
    assert [i.step for i in infos] == [1, 2]
    assert infos[1].metrics == {"loss": pytest.approx(1 / 3)}
    if compression:
        assert infos[1].stored_nbytes < infos[1].nbytes
    assert remote.uploads() == [], "a committed save left a multipart upload behind"


def test_deleting_the_manifest_makes_the_step_invisible(remote):
    save(remote, (1, 2))
    remote.delete("step-0000000002/manifest.json")
    ck, _, _ = fresh(remote)
    assert ck.latest_step() == 1
    assert [i.step for i in ck.list_checkpoints()] == [1]
    with pytest.raises(CheckpointNotFoundError):
        ck.load(2)
    load_exact(remote, None, 1)
    ck.save(2).wait()      # the data left behind does not block saving that step again
    ck.close()
    assert fresh(remote)[0].latest_step() == 2


def test_saving_a_committed_step_again_is_refused(remote):
    save(remote, (1,))
    before = remote.get("step-0000000001/manifest.json")
    ck, _, _ = fresh(remote)
    with pytest.raises(Exception, match="already committed"):
        ck.save(1)
    ck.close()
    assert remote.get("step-0000000001/manifest.json") == before


@pytest.mark.parametrize("compression", COMPRESSION)
def test_retention_keeps_the_last_two(seaweedfs, compression):
    remote = Remote(seaweedfs)
    save(remote, (1, 2, 3, 4), compression=compression, keep_last=2)
    ck, _, _ = fresh(remote)
    assert [i.step for i in ck.list_checkpoints()] == [3, 4]
    # SeaweedFS still lists the emptied prefixes for a while: only the objects tell.
    assert {k.split("/")[0] for k in remote.keys()} == {"step-0000000003", "step-0000000004"}
    load_exact(remote, 3, 3)


def test_keep_best_with_late_metrics(seaweedfs):
    remote = Remote(seaweedfs)
    for step, loss in ((1, 0.1), (2, 0.5), (3, 0.9)):
        with checkpointer(remote, a_module(step), Box(b_state(step)), keep_last=1,
                          keep_best=1, best_metric="loss") as ck:
            ck.save(step).wait()
            ck.report_metrics(step, {"loss": loss})
    ck, _, _ = fresh(remote)
    assert [(i.step, i.metrics["loss"]) for i in ck.list_checkpoints()] == [(1, 0.1), (3, 0.9)]


@pytest.mark.parametrize("compression", COMPRESSION)
def test_flipped_bit_in_a_data_object(remote, compression):
    save(remote, (1, 2), compression=compression)
    name = remote.data_file(2)
    entry = remote.manifest(2)["components"]["b"]["shards"]["global"]["tensors"][0]
    data = bytearray(remote.get(name))
    data[entry["offset"] + entry["length"] // 2] ^= 0x10
    remote.put(name, bytes(data))
    load_fails(remote, 2, "hash", name.split("/")[-1])
    load_exact(remote, 1, 1)


@pytest.mark.parametrize("compression", COMPRESSION)
def test_truncated_or_missing_data_object(remote, compression):
    save(remote, (1, 2), compression=compression)
    name = remote.data_file(2)
    remote.put(name, remote.get(name)[:-100])
    load_fails(remote, 2, name.split("/")[-1])
    remote.delete(name)
    load_fails(remote, 2, "missing")
    load_exact(remote, 1, 1)


def test_unreadable_manifest(remote):
    save(remote, (1, 2))
    remote.put("step-0000000002/manifest.json", b"{ not json")
    load_fails(remote, 2, "manifest.json")
    ck, _, _ = fresh(remote)
    assert [i.step for i in ck.list_checkpoints()] == [1]   # logged and skipped


@pytest.mark.parametrize("compression", COMPRESSION)
def test_tensor_larger_than_100_mib_uses_several_parts(seaweedfs, compression):
    remote = Remote(seaweedfs)
    big = torch.arange(27 << 20, dtype=torch.float32)          # 108 MiB, half of it compressible
    # Every other value is noise: byte-grouped zstd squeezes a clean ramp into one part.
    big[::2] = torch.randn(big[::2].shape)
    state = Box({"big": big, "tail": torch.ones(3)})
    with AsyncCheckpointer(remote.url, [StateComponent("s", state, G)], compression=compression,
                           storage_options=remote.options()) as ck:
        ck.save(7).wait()
    name = remote.data_file(7)
    parts = remote.c.head_object(Bucket=remote.bucket, Key=f"{remote.prefix}/{name}",
                                 PartNumber=1).get("PartsCount", 1)
    stored = remote.manifest(7)["stored_nbytes"]
    assert parts == -(-stored // (16 << 20)) and parts >= (2 if compression else 7)
    assert remote.uploads() == []
    back = Box(None)
    with AsyncCheckpointer(remote.url, [StateComponent("s", back, G)],
                           storage_options=remote.options()) as ck:
        assert ck.load().step == 7
    assert torch.equal(back.loaded["big"], big) and torch.equal(back.loaded["tail"], torch.ones(3))
