"""One conformance suite that every Storage backend passes (async_ckpt.storage.testing.conformance),
here on local disk, fsspec's memory://, SeaweedFS and moto; plus local-only checks."""
import uuid

import pytest

from async_ckpt.storage import FsspecStorage, LocalStorage, S3Storage, open_storage
from async_ckpt.storage.testing.conformance import FilesystemConformance, StorageConformance


class TestLocal(FilesystemConformance):
    @pytest.fixture
    def storage(self, tmp_path):
        return open_storage(tmp_path / "root")


class TestFsspecMemory(StorageConformance):
    @pytest.fixture
    def storage(self):
        return open_storage(f"memory://conformance-{uuid.uuid4().hex}")


class TestS3SeaweedFS(StorageConformance):
    @pytest.fixture
    def storage(self, seaweedfs):           # a real S3 server (async_ckpt.storage.testing.servers)
        return open_storage(seaweedfs.fresh_root(), seaweedfs.storage_options())


class TestS3Moto(StorageConformance):
    @pytest.fixture
    def storage(self, moto):
        return open_storage(moto.fresh_root(), moto.storage_options())


def test_backend_selection(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage("memory://x"), FsspecStorage)
    assert isinstance(open_storage("s3://bucket/prefix"), S3Storage)   # no request is sent yet


def test_local_check_root_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    for root in (tmp_path / "f", tmp_path / "f" / "sub" / "deeper"):
        with pytest.raises(NotADirectoryError):
            open_storage(root).check_root()
