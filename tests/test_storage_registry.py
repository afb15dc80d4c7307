"""Backends are picked by URL scheme from a registry a third party can add to, and the engine
translates the storage layer's own errors (OSErrors) into its user-facing classes."""
from __future__ import annotations

import errno

import pytest

import async_ckpt
from async_ckpt import (AsyncCheckpointer, CheckpointError, InvalidArgumentError, SaveFailedError,
                        StateComponent)
from async_ckpt.errors import storage_errors_translated, translate_storage_error
from async_ckpt.storage import (FsspecStorage, LocalStorage, S3Storage, open_storage, register_backend,
                                registered_schemes, unregister_backend)
from async_ckpt.storage import errors as storage_errors
from support.compare import assert_same
from support.corruption import G, b_state
from support.stateful import Box


class MyStorage(LocalStorage):
    """A third-party backend: local files under a folder, addressed as myfs://NAME."""

    def __init__(self, root: str, folder, **options):
        super().__init__(str(folder / root.split("://", 1)[1]))
        self.url, self.options = root, options

    def child_url(self, path: str) -> str:
        return f"{self.url}/{path}" if path else self.url


@pytest.fixture
def myfs(tmp_path):
    opened = []

    def factory(root, storage_options):
        opened.append((root, storage_options))
        return MyStorage(root, tmp_path, **storage_options)
    register_backend("myfs", factory)
    yield opened
    unregister_backend("myfs")


def test_builtin_schemes(tmp_path):
    assert {"", "file", "s3", "s3a"} <= set(registered_schemes())
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage(f"FILE://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}/x").root == str(tmp_path / "x")
    for scheme in ("s3", "s3a"):
        st = open_storage(f"{scheme}://bucket/pre/fix", {"part_size": 8 << 20})   # nothing sent yet
        assert isinstance(st, S3Storage) and (st.bucket, st.prefix) == ("bucket", "pre/fix")
        assert st.settings.part_size == 8 << 20
    assert isinstance(open_storage("memory://anything"), FsspecStorage)   # unregistered: fsspec


def test_a_third_party_scheme_serves_the_checkpointer(myfs, tmp_path):
    st = open_storage("myfs://run", {"flavour": "x"})
    assert isinstance(st, MyStorage) and st.options == {"flavour": "x"}
    assert myfs == [("myfs://run", {"flavour": "x"})]
    with AsyncCheckpointer("myfs://run", [StateComponent("b", Box(b_state(1)), G)]) as ck:
        info = ck.save(1).wait()
    assert info.url == "myfs://run/step-0000000001"
    assert (tmp_path / "run" / "step-0000000001" / "manifest.json").is_file()
    back = Box(None)
    assert AsyncCheckpointer("myfs://run", [StateComponent("b", back, G)]).load().step == 1
    assert_same(back.loaded, b_state(1))


def test_registering_twice_needs_clobber(myfs, tmp_path):
    other = lambda root, options: LocalStorage(str(tmp_path / "other"))   # noqa: E731
    with pytest.raises(ValueError, match="clobber"):
        register_backend("myfs", other)
    register_backend("myfs", other, clobber=True)
    assert open_storage("myfs://run").root == str(tmp_path / "other")
    unregister_backend("myfs")
    with pytest.raises((ValueError, ImportError)):   # back to fsspec, which knows no "myfs"
        open_storage("myfs://run")
    for bad in ("1abc", "my fs", "a/b", None):
        with pytest.raises(ValueError):
            register_backend(bad, other)
    with pytest.raises(TypeError):
        register_backend("myfs", 42)


def test_a_factory_by_dotted_path_is_imported_on_first_use(tmp_path):
    register_backend("lazyfs", "async_ckpt.storage.registry._open_local")
    register_backend("brokenfs", "no_such_package_here.open_it")
    try:
        assert isinstance(open_storage(f"lazyfs://{tmp_path}"), LocalStorage)
        with pytest.raises(storage_errors.StorageConfigError, match="cannot be imported"):
            open_storage("brokenfs://x")
        with pytest.raises(async_ckpt.StorageConfigError, match="cannot be imported"):
            AsyncCheckpointer("brokenfs://x", [StateComponent("b", Box(b_state(1)), G)])
    finally:
        unregister_backend("lazyfs")
        unregister_backend("brokenfs")


# -- error translation ---------------------------------------------------------------------------
def test_storage_errors_are_oserrors_and_the_engine_translates_them():
    config = storage_errors.StorageConfigError("bucket 'b' does not exist; create it first")
    down = storage_errors.StorageUnavailableError("kept failing; retry later")
    assert all(isinstance(e, OSError) and isinstance(e, storage_errors.StorageError) for e in (config, down))
    assert not isinstance(config, CheckpointError)
    new = translate_storage_error(config)
    assert type(new) is async_ckpt.StorageConfigError and new.__cause__ is config
    assert isinstance(new, InvalidArgumentError) and isinstance(new, ValueError)
    assert str(new) == str(config)
    new = translate_storage_error(down)
    assert type(new) is async_ckpt.StorageUnavailableError and new.__cause__ is down
    assert isinstance(new, CheckpointError) and str(new) == str(down)
    plain = FileNotFoundError(errno.ENOENT, "missing")
    assert translate_storage_error(plain) is plain
    assert {"StorageConfigError", "StorageUnavailableError"} <= set(async_ckpt.__all__)

    @storage_errors_translated
    def fails(exc):
        raise exc
    with pytest.raises(async_ckpt.StorageUnavailableError) as info:
        fails(down)
    assert info.value.__cause__ is down
    with pytest.raises(FileNotFoundError):
        fails(plain)


class FlakyStorage(MyStorage):
    """Fails in the ways the storage layer reports, on demand."""
    fail: dict = {}

    def check_root(self):
        if "check_root" in self.fail:
            raise self.fail["check_root"]

    def list_dir(self, path):
        if "list_dir" in self.fail:
            raise self.fail["list_dir"]
        return super().list_dir(path)

    def open_writer(self, path):
        if "open_writer" in self.fail:
            raise self.fail["open_writer"]
        return super().open_writer(path)

    def read_limited(self, path, limit):
        if "read_limited" in self.fail:
            raise self.fail["read_limited"]
        return super().read_limited(path, limit)

    def size(self, path):
        if "size" in self.fail:
            raise self.fail["size"]
        return super().size(path)


@pytest.fixture
def flaky(tmp_path):
    FlakyStorage.fail = {}
    register_backend("flaky", lambda root, options: FlakyStorage(root, tmp_path))
    yield FlakyStorage.fail
    unregister_backend("flaky")


def test_users_see_the_engine_classes(flaky):
    comps = [StateComponent("b", Box(b_state(1)), G)]
    flaky["check_root"] = storage_errors.StorageConfigError("flaky://run: no such bucket; create it")
    with pytest.raises(async_ckpt.StorageConfigError, match="create it") as info:
        AsyncCheckpointer("flaky://run", comps)
    assert isinstance(info.value.__cause__, storage_errors.StorageConfigError)
    del flaky["check_root"]

    ck = AsyncCheckpointer("flaky://run", comps)
    ck.save(1).wait()
    flaky["list_dir"] = storage_errors.StorageUnavailableError("list kept failing")
    for call in (ck.latest_step, ck.list_checkpoints, ck.load):
        with pytest.raises(async_ckpt.StorageUnavailableError, match="kept failing"):
            call()
    del flaky["list_dir"]
    for method in ("read_limited", "size"):         # the manifest, then the data files' sizes
        flaky[method] = storage_errors.StorageUnavailableError(f"{method} kept failing")
        with pytest.raises(async_ckpt.StorageUnavailableError, match=method):   # not "corrupt"
            ck.load(1)
        del flaky[method]

    flaky["open_writer"] = storage_errors.StorageUnavailableError("put kept failing")
    handle = ck.save(2)
    with pytest.raises(SaveFailedError) as info:
        handle.wait(timeout=30)
    assert type(info.value.__cause__) is async_ckpt.StorageUnavailableError
    assert isinstance(info.value.__cause__.__cause__, storage_errors.StorageUnavailableError)
    assert type(info.value.causes[0]) is async_ckpt.StorageUnavailableError
    del flaky["open_writer"]
    ck.save(3).wait()
    ck.close()
    assert [i.step for i in AsyncCheckpointer("flaky://run", comps).list_checkpoints()] == [1, 3]
