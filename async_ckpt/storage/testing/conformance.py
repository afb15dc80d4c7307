"""The storage conformance suite: what every `Storage` backend must do, as a pytest base class.

A backend's test module subclasses `StorageConformance` and provides a `storage` fixture that
returns a fresh, empty Storage (a new root no other test uses); pytest then runs every test below
on it. The class name must start with ``Test`` for pytest to collect it::

    import pytest
    from async_ckpt.storage.testing.conformance import StorageConformance

    class TestMyBackend(StorageConformance):
        @pytest.fixture
        def storage(self, tmp_path):
            return MyStorage(tmp_path / "root")

tests/test_storage_conformance.py runs it on local disk, fsspec's memory://, SeaweedFS and moto.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Any, Callable

import pytest

from ..base import SEGMENT_ALIGN, Storage
from ..local import LocalStorage


def bounded(call: Callable[[], Any], seconds: float = 10.0, fifos: tuple = ()) -> Any:
    """`call()`'s result, re-raising its exception; fails the test if it takes longer than
    `seconds` (a read stuck on a FIFO in `fifos` is released first, so no thread is left blocked)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:      # a reader blocked in open() or read() gets EOF
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5)
        pytest.fail(f"{call} blocked for more than {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class StorageConformance:
    """Tests of the `Storage` protocol; subclasses provide the `storage` fixture."""

    @pytest.fixture
    def storage(self) -> Storage:
        raise NotImplementedError(f"{type(self).__name__} must define a `storage` fixture that "
                                  "returns a fresh Storage (see async_ckpt.storage.testing.conformance)")

    def test_implements_the_protocol(self, storage):
        assert isinstance(storage, Storage)
        assert isinstance(storage.url, str) and storage.url

    def test_streamed_write_and_ranged_read(self, storage):
        storage.check_writable()
        w = storage.open_writer("a/data.bin")
        payload = bytes(range(256)) * 1000
        for i in range(0, len(payload), 7777):
            w.write(memoryview(payload)[i:i + 7777])
        w.commit()
        storage.sync_dir("a")
        assert storage.size("a/data.bin") == len(payload)
        assert storage.read_bytes("a/data.bin") == payload
        out = bytearray(1000)
        storage.read_into("a/data.bin", 12345, memoryview(out))
        assert bytes(out) == payload[12345:13345]
        with pytest.raises(EOFError):
            storage.read_into("a/data.bin", len(payload) - 10, memoryview(bytearray(20)))

    def test_abort_leaves_nothing(self, storage):
        w = storage.open_writer("b/x.bin")
        w.write(memoryview(b"half"))
        w.abort()
        assert not storage.exists("b/x.bin")

    def test_exclusive_create(self, storage):
        storage.check_writable()
        storage.create_exclusive("c/manifest.json", b"one")
        with pytest.raises(FileExistsError):
            storage.create_exclusive("c/manifest.json", b"two")
        assert storage.read_bytes("c/manifest.json") == b"one"
        assert [n for n in storage.list_dir("c") if not n.startswith(".")] == ["manifest.json"]

    def test_list_and_delete(self, storage):
        for name in ("d/1.bin", "d/2.bin", "e/3.bin"):
            w = storage.open_writer(name)
            w.write(memoryview(b"x"))
            w.commit()
        assert {"d", "e"} <= set(storage.list_dir(""))
        assert storage.list_dir("d") == ["1.bin", "2.bin"]
        assert storage.list_dir("missing") == []
        storage.delete("d/1.bin")
        storage.delete("d/1.bin")               # missing is fine
        assert storage.list_dir("d") == ["2.bin"]
        storage.delete_dir("d")
        storage.delete_dir("d")
        assert not storage.exists("d/2.bin")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("d/2.bin")
        with pytest.raises(FileNotFoundError):
            storage.size("d/2.bin")

    def test_check_root_passes_on_a_usable_root_and_writes_nothing(self, storage):
        storage.check_root()
        assert storage.list_dir("") == []

    def test_read_limited_reads_whole_small_objects_only(self, storage):
        storage.check_writable()
        payload = bytes(range(256)) * 4
        w = storage.open_writer("f/doc.json")
        w.write(memoryview(payload))
        w.commit()
        storage.create_exclusive("f/empty.json", b"")
        assert storage.read_limited("f/doc.json", len(payload)) == payload
        assert storage.read_limited("f/doc.json", 1 << 40) == payload
        assert storage.read_limited("f/empty.json", 0) == b""
        with pytest.raises(OSError) as info:
            storage.read_limited("f/doc.json", len(payload) - 1)
        assert info.value.errno == errno.EFBIG and not isinstance(info.value, FileNotFoundError)
        with pytest.raises(FileNotFoundError):
            storage.read_limited("f/missing.json", 10)


    # -- segmented objects (Storage.open_segmented) ----------------------------------------------
    @staticmethod
    def write_segments(writer, payloads: dict[int, bytes], piece: int = 7777) -> None:
        """Each payload into its segment: one thread per segment when the writer is parallel
        (started together), else one after another in index order."""
        def one(index: int) -> None:
            seg = writer.segment(index)
            data = payloads[index]
            for i in range(0, len(data), piece):
                seg.write(memoryview(data)[i:i + piece])
            assert seg.close() == len(data)
        if not writer.parallel:
            for index in sorted(payloads):
                one(index)
            return
        barrier = threading.Barrier(len(payloads))
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                barrier.wait(10)
                one(index)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                errors.append(exc)
        threads = [threading.Thread(target=run, args=(i,)) for i in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors

    def test_segmented_object_holds_every_segment_at_its_offset(self, storage):
        storage.check_writable()
        payloads = {0: os.urandom(70_000), 1: b"", 2: os.urandom(5000), 3: os.urandom(100)}
        writer = storage.open_segmented("g/node.bin", [80_000, 0, 5000, 4096])
        assert isinstance(writer.parallel, bool)
        self.write_segments(writer, payloads)
        layout = writer.commit()
        storage.sync_dir("g")
        assert len(layout.segments) == 4
        assert storage.size("g/node.bin") == layout.size
        whole = storage.read_bytes("g/node.bin")
        assert len(whole) == layout.size
        end = 0
        for index, (offset, length) in enumerate(layout.segments):
            assert offset % SEGMENT_ALIGN == 0 and offset >= end, (index, layout)
            assert length == len(payloads[index])
            assert whole[offset:offset + length] == payloads[index]
            assert whole[end:offset] == bytes(offset - end)       # between segments: zeros
            end = offset + length
        assert end == layout.size
        out = bytearray(50)
        offset = layout.segments[2][0]
        storage.read_into("g/node.bin", offset + 10, memoryview(out))
        assert bytes(out) == payloads[2][10:60]

    def test_segmented_object_refuses_more_than_a_segments_capacity(self, storage):
        writer = storage.open_segmented("h/node.bin", [100, 100])
        try:
            seg = writer.segment(0)
            seg.write(memoryview(b"x" * 100))
            with pytest.raises(ValueError):
                seg.write(memoryview(b"y"))
        finally:
            writer.abort()
        assert not storage.exists("h/node.bin")

    def test_segmented_abort_leaves_nothing(self, storage):
        storage.check_writable()
        writer = storage.open_segmented("i/node.bin", [6 << 20, 4096])
        self.write_segments(writer, {0: os.urandom(6 << 20), 1: b"z" * 4096})
        writer.abort()
        writer.abort()                      # twice is fine
        assert not storage.exists("i/node.bin")
        assert [n for n in storage.list_dir("i") if not n.startswith(".")] == []
        uploads = getattr(storage, "list_uploads", None)
        if uploads is not None:             # S3: the multipart upload is gone too
            assert uploads("i") == []


class FilesystemConformance(StorageConformance):
    """The contract of backends over a filesystem (symlinks, FIFOs, devices and folders exist
    there): the suite above plus the refusal of anything that is not a regular file under the
    root. Subclass it instead of StorageConformance for such a backend."""

    def test_reads_refuse_what_is_not_a_regular_file_inside_the_root(self, storage, tmp_path):
        """Filesystems only: symlinks below the root (out of it, to a device, or even inside it),
        FIFOs and folders are refused by every read, promptly; the root itself may be a symlink."""
        storage.check_writable()
        root = storage.root
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "doc.json").write_bytes(b'{"loss": 1}')
        os.makedirs(os.path.join(root, "s"))
        with open(os.path.join(root, "s", "plain.json"), "wb") as f:
            f.write(b'{"loss": 2}')
        hostile = {
            "s/link-out.json": lambda p: os.symlink(outside / "doc.json", p),
            "s/dev-zero.json": lambda p: os.symlink("/dev/zero", p),
            "s/link-inside.json": lambda p: os.symlink("plain.json", p),
            "s/fifo.json": os.mkfifo,
            "s/folder.json": os.mkdir,
            "linked-folder/doc.json": lambda p: os.symlink(outside, os.path.dirname(p)),
        }
        fifos = []
        for path, make in hostile.items():
            make(os.path.join(root, *path.split("/")))
            if path.endswith("fifo.json"):
                fifos.append(os.path.join(root, *path.split("/")))
        for path in hostile:
            for name, call in {"read_limited": lambda p=path: storage.read_limited(p, 1 << 20),
                               "size": lambda p=path: storage.size(p),
                               "read_into": lambda p=path: storage.read_into(p, 0, memoryview(bytearray(4))),
                               "empty read_into": lambda p=path: storage.read_into(p, 0, memoryview(bytearray(0)))
                               }.items():
                with pytest.raises(OSError) as info:
                    bounded(call, fifos=tuple(fifos))
                assert not isinstance(info.value, FileNotFoundError), (path, name, info.value)
        assert storage.read_limited("s/plain.json", 100) == b'{"loss": 2}'
        linked_root = tmp_path / "linked-root"
        linked_root.symlink_to(root)
        assert LocalStorage(str(linked_root)).read_limited("s/plain.json", 100) == b'{"loss": 2}'
