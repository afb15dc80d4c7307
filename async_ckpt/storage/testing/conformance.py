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

import pytest

from ..base import Storage


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
