"""Listing at scale: `format.names.committed_steps` (behind latest_step, list_checkpoints,
retention, load and the command line) finds in one pass exactly the steps one request per step
folder finds, symlinked manifests
included, and on S3 in one listing of the root instead of one request per step folder (falling
back to those when the listing would take more); one write probe per node on a first save."""
from __future__ import annotations

from collections import Counter

from async_ckpt import checkpointer
from async_ckpt.dist.topology import Topology
from async_ckpt.format.names import committed_steps, manifest_path, step_dir
from async_ckpt.storage import LocalStorage, open_storage


def _fill(storage, committed: list[int], uncommitted: list[int]) -> None:
    for step in committed:
        storage.create_exclusive(f"{step_dir(step)}/data-x.bin", b"d")
        storage.create_exclusive(manifest_path(step), b"{}")
    for step in uncommitted:
        storage.create_exclusive(f"{step_dir(step)}/data-x.bin", b"d")


def test_local_listing_finds_what_exists_finds(tmp_path):
    storage = LocalStorage(str(tmp_path))
    _fill(storage, [1, 2, 5], [3])
    (tmp_path / step_dir(7)).mkdir()
    (tmp_path / step_dir(7) / "manifest.json").symlink_to(tmp_path / manifest_path(1))  # refused at load
    (tmp_path / step_dir(8)).mkdir()
    (tmp_path / step_dir(8) / "manifest.json").symlink_to(tmp_path / "nowhere")        # dangling
    assert committed_steps(storage) == committed_steps(storage, one_pass=False) == [1, 2, 5, 7]


def test_fsspec_listing_is_one_find_instead_of_an_exists_per_step(monkeypatch):
    import fsspec
    fs = fsspec.filesystem("memory")
    storage = open_storage(f"memory://scale-listing-{id(fs)}")
    _fill(storage, [1, 2, 5], [3, 4])
    calls: Counter = Counter()
    for method in ("exists", "find"):
        real = getattr(type(fs), method)
        monkeypatch.setattr(type(fs), method, lambda self, *a, _real=real, _m=method, **k: (
            calls.update([_m]), _real(self, *a, **k))[1])
    assert committed_steps(storage) == [1, 2, 5]
    assert calls == {"find": 1}, calls
    calls.clear()
    assert committed_steps(storage, one_pass=False) == [1, 2, 5] and calls["exists"] == 5


def _counting(storage) -> Counter:
    counts: Counter = Counter()
    real = storage.call

    async def counted(method, path, **kwargs):
        counts[method] += 1
        return await real(method, path, **kwargs)
    storage.call = counted
    return counts


def test_s3_listing_takes_one_listing_instead_of_a_head_per_step(moto):
    storage = open_storage(moto.fresh_root(), moto.storage_options())
    _fill(storage, [1, 2, 3, 4, 5, 6], [7])
    counts = _counting(storage)
    assert committed_steps(storage) == [1, 2, 3, 4, 5, 6]
    fast = dict(counts)
    counts.clear()
    assert committed_steps(storage, one_pass=False) == [1, 2, 3, 4, 5, 6]
    # Both list the root's folders (objects and unfinished uploads); then one page of keys
    # instead of a HEAD per folder.
    assert fast == {"list_objects_v2": 2, "list_multipart_uploads": 1}, fast
    assert counts["head_object"] == 7 and sum(counts.values()) == 9, counts
    counts.clear()
    # When the keys take more pages than the folders would take HEADs, fall back to the HEADs.
    assert storage.find_named("manifest.json", 1) is not None          # one page suffices here
    for extra in range(1001):                                            # more than 1,000 keys: 2 pages
        storage.create_exclusive(f"{step_dir(1)}/more-{extra}", b"")
    counts.clear()
    assert storage.find_named("manifest.json", 1) is None and counts["list_objects_v2"] == 1
    assert committed_steps(storage, {1: step_dir(1), 2: step_dir(2)}) == [1, 2]


def test_only_node_writers_run_the_write_probe():
    probing = [r for r in range(8) if checkpointer.probes_writability(Topology(r, 8, r % 4, 4, r // 4))]
    assert probing == [0, 4]
