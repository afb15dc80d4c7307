"""One conformance suite that every Storage backend passes."""
import uuid

import pytest

from async_ckpt.storage import FsspecStorage, LocalStorage, Storage, open_storage


@pytest.fixture(params=["local", "memory", "seaweedfs", "moto"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "root")
    if request.param == "memory":
        return open_storage(f"memory://conformance-{uuid.uuid4().hex}")
    server = request.getfixturevalue(request.param)      # a real S3 server (tests/s3_servers.py)
    return open_storage(server.fresh_root(), server.storage_options())


def test_backend_selection(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("memory://x"), FsspecStorage)


def test_streamed_write_and_ranged_read(storage):
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


def test_abort_leaves_nothing(storage):
    w = storage.open_writer("b/x.bin")
    w.write(memoryview(b"half"))
    w.abort()
    assert not storage.exists("b/x.bin")


def test_exclusive_create(storage):
    storage.check_writable()
    storage.create_exclusive("c/manifest.json", b"one")
    with pytest.raises(FileExistsError):
        storage.create_exclusive("c/manifest.json", b"two")
    assert storage.read_bytes("c/manifest.json") == b"one"
    assert [n for n in storage.list_dir("c") if not n.startswith(".")] == ["manifest.json"]


def test_list_and_delete(storage):
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


def test_check_root_passes_on_a_usable_root_and_writes_nothing(storage):
    storage.check_root()
    assert storage.list_dir("") == []


def test_local_check_root_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    for root in (tmp_path / "f", tmp_path / "f" / "sub" / "deeper"):
        with pytest.raises(NotADirectoryError):
            open_storage(root).check_root()
