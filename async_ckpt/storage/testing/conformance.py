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

from ..base import Storage
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
