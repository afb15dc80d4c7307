"""The load paths of loader.py/readbuf.py: private mappings of local files (hashed chunk by chunk
as they are populated), fresh buffers read in chunks (fallback, and every other backend), and
moving kept tensors off the checkpoint file after load_state_dict."""
from __future__ import annotations

import errno
import logging
import os

import pytest
import torch

from async_ckpt import AsyncCheckpointer, CorruptCheckpointError, SharingPattern, StateComponent
from async_ckpt.load import readbuf
from async_ckpt.storage import LocalStorage
from support.compare import assert_same
from support.stateful import Copying, Holder

P = SharingPattern.PER_RANK
PAGE = 4096


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(50_000, generator=g),                         # straddles chunks
        "odd_bf16": torch.randn(33_333, generator=g).to(torch.bfloat16),  # unaligned tail
        "empty": torch.empty(0, 7),
        "small": torch.arange(100, dtype=torch.int64),                    # own storage
        "u8": torch.randint(0, 255, (70_001,), dtype=torch.uint8, generator=g),
        "last": torch.randn(12_345, dtype=torch.float64, generator=g),    # ends mid-page
    }


def blank(sd):
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def save(root, sd, compression=None, key="c"):
    with AsyncCheckpointer(root, [StateComponent(key, Copying(sd), P)], compression=compression) as ck:
        ck.save(1).wait()


def data_files(root) -> list[str]:
    folder = os.path.join(root, sorted(d for d in os.listdir(root) if d.startswith("step-"))[0])
    return [os.path.join(folder, n) for n in os.listdir(folder) if n != "manifest.json"]


def mapped_files() -> str:
    """What this process maps, and the files it holds open: neither may name a checkpoint file
    after a load (retention could not free a deleted one)."""
    with open("/proc/self/maps") as f:
        text = f.read()
    for fd in os.listdir("/proc/self/fd"):
        try:
            text += "\n" + os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return text


@pytest.fixture
def small_chunks(monkeypatch):
    """Two-page chunks: every record of make_state() straddles chunk boundaries."""
    monkeypatch.setattr(readbuf, "CHUNK", 2 * PAGE)


@pytest.fixture
def spy_map(monkeypatch):
    calls = []
    real = LocalStorage.map_private

    def spy(self, path, offset, length):
        calls.append((path, offset, length))
        return real(self, path, offset, length)

    monkeypatch.setattr(LocalStorage, "map_private", spy)
    return calls


@pytest.fixture(params=["mapped", "fresh"])
def path_kind(request, monkeypatch):
    if request.param == "mapped":
        if not readbuf.mapping_supported():
            pytest.fail("this kernel lacks MADV_POPULATE_READ (Linux >= 5.14): the mapped path "
                        "cannot be tested here")
    else:
        monkeypatch.setattr(readbuf, "_populate_ok", False)
    return request.param


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_round_trip_bit_exact(tmp_path, small_chunks, spy_map, path_kind, compression):
    sd = make_state()
    save(tmp_path, sd, compression)
    target = Copying(blank(sd))
    with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
        ck.load()
    assert_same(target.state, sd)
    assert bool(spy_map) == (path_kind == "mapped")
    assert str(tmp_path) not in mapped_files()     # nothing kept: the mapping is gone


def test_default_chunks_round_trip(tmp_path, spy_map):
    sd = {"a": torch.randn(5 << 20), "b": torch.randn(3)}   # 20 MiB: more than one CHUNK
    save(tmp_path, sd)
    target = Copying(blank(sd))
    with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
        ck.load()
    assert_same(target.state, sd)
    assert spy_map


def test_kept_tensors_leave_the_file(tmp_path, small_chunks, path_kind):
    sd = make_state(1)
    save(tmp_path, sd)
    before = [open(p, "rb").read() for p in data_files(tmp_path)]
    target = Holder({})
    with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
        ck.load()
    assert_same(target.state, sd)
    assert str(tmp_path) not in mapped_files()
    for t in target.state.values():
        if t.numel():
            t.view(torch.uint8).view(-1)[0] ^= 0xFF       # writable, and private
    assert [open(p, "rb").read() for p in data_files(tmp_path)] == before
    # small records have their own storage (Generator.set_state reads from the storage start)
    small = target.state["small"]
    assert small.untyped_storage().data_ptr() == small.data_ptr()
    assert small.untyped_storage().nbytes() == small.numel() * small.element_size()


def test_module_and_optimizer_resume(tmp_path, spy_map):
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 300)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 300)).sum().backward()
    opt.step()
    comps = lambda m, o: [StateComponent("model", m, P), StateComponent("optim", o, P)]  # noqa: E731
    with AsyncCheckpointer(tmp_path, comps(model, opt)) as ck:
        ck.save(1).wait()
    model2 = torch.nn.Linear(300, 300)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    with AsyncCheckpointer(tmp_path, comps(model2, opt2)) as ck:
        ck.load()
    assert spy_map
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for (_, s), (_, s2) in zip(sorted(opt.state_dict()["state"].items()),
                               sorted(opt2.state_dict()["state"].items())):
        for k in s:
            assert torch.equal(s[k], s2[k]), k
    assert str(tmp_path) not in mapped_files()    # the optimizer kept its moments: moved off
    x = torch.randn(4, 300)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_detach_failure_keeps_data_and_warns(tmp_path, monkeypatch, caplog):
    sd = make_state(2)
    save(tmp_path, sd)

    def fail(addr, size):
        raise OSError(errno.ENOMEM, "no memory")

    monkeypatch.setattr(readbuf, "_detach", fail)
    target = Holder({})
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
            ck.load()
    assert_same(target.state, sd)
    assert "stay mapped" in caplog.text


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_corruption_found_before_any_load_state_dict(tmp_path, small_chunks, path_kind,
                                                     compression, where):
    first, second = make_state(3), make_state(4)
    comps = [StateComponent("a", Copying(first), P), StateComponent("b", Copying(second), P)]
    with AsyncCheckpointer(tmp_path, comps, compression=compression) as ck:
        ck.save(1).wait()
    victim = max(data_files(tmp_path), key=os.path.getsize)
    with open(victim, "r+b") as f:
        size = os.path.getsize(victim)
        pos = PAGE * 3 + 5 if where == "first" else size - 100
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    a, b = Copying(blank(first)), Copying(blank(second))
    with AsyncCheckpointer(tmp_path, [StateComponent("a", a, P), StateComponent("b", b, P)]) as ck:
        with pytest.raises(CorruptCheckpointError):
            ck.load()
    assert a.loads == b.loads == 0
    assert all(not t.any() for t in a.state.values()) and all(not t.any() for t in b.state.values())
    assert str(tmp_path) not in mapped_files()


def test_populate_error_is_a_corrupt_checkpoint(tmp_path, small_chunks, monkeypatch):
    sd = make_state(5)
    save(tmp_path, sd)
    real, seen = readbuf._madvise, []

    def flaky(addr, length, advice):
        seen.append(advice)
        if advice == readbuf._MADV_POPULATE_READ and len(seen) == 3:
            raise OSError(errno.EFAULT, "Bad address")       # what an I/O error looks like
        real(addr, length, advice)

    monkeypatch.setattr(readbuf, "_madvise", flaky)
    target = Copying(blank(sd))
    with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
        with pytest.raises(CorruptCheckpointError, match="cannot read bytes"):
            ck.load()
    assert target.loads == 0


def test_chunked_read_error_is_a_corrupt_checkpoint(tmp_path, small_chunks, monkeypatch):
    sd = make_state(6)
    save(tmp_path, sd)
    monkeypatch.setattr(readbuf, "_populate_ok", False)
    calls = []
    real = LocalStorage.read_into

    def flaky(self, path, offset, out):
        calls.append(offset)
        if len(calls) == 4:
            raise EOFError("short read")
        real(self, path, offset, out)

    monkeypatch.setattr(LocalStorage, "read_into", flaky)
    target = Copying(blank(sd))
    with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
        with pytest.raises(CorruptCheckpointError, match="cannot read bytes"):
            ck.load()
    assert target.loads == 0


def test_unmappable_file_falls_back_to_reading(tmp_path, small_chunks, monkeypatch):
    sd = make_state(7)
    save(tmp_path, sd)

    def refuse(self, path, offset, length):
        raise OSError(errno.ENODEV, "No such device")         # what mmap says on some filesystems

    monkeypatch.setattr(LocalStorage, "map_private", refuse)
    target = Copying(blank(sd))
    with AsyncCheckpointer(tmp_path, [StateComponent("c", target, P)]) as ck:
        ck.load()
    assert_same(target.state, sd)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_memory_filesystem_round_trip(small_chunks, compression):
    root = f"memory://load-paths-{compression}"
    sd = make_state(8)
    save(root, sd, compression)
    target = Holder({})
    with AsyncCheckpointer(root, [StateComponent("c", target, P)]) as ck:
        ck.load()
    assert_same(target.state, sd)


def test_group_starting_mid_page(tmp_path, small_chunks, spy_map):
    """A shard whose bytes start inside a page: the mapping starts on the page before it."""
    sd = {"a": torch.randn(1000), "b": torch.randn(40_000)}
    comps = [StateComponent("x", Copying({"t": torch.randn(77)}), P), StateComponent("y", Copying(sd), P)]
    with AsyncCheckpointer(tmp_path, comps) as ck:
        ck.save(1).wait()
    target = Copying(blank(sd))
    with AsyncCheckpointer(tmp_path, [StateComponent("y", target, P)]) as ck:
        ck.load()
    assert_same(target.state, sd)
    assert spy_map and all(start % PAGE for _, start, _ in spy_map)
