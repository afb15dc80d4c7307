"""S3 (and S3-compatible servers) through s3fs's aiobotocore client.

Owns every request async_ckpt sends to S3. Each one goes through `retry.retry_async` (botocore's
and s3fs's own retries are turned off) and failures are translated by `s3_errors`. Rules kept here,
from DESIGN §4: nothing is ever renamed; data objects are multipart uploads that become visible
only when complete (`s3_writer`, and `s3_segments` for a node's segmented object, which see only
the `UploadTarget` that `_target` builds: a request function bound to the object, the loop runner,
the key and the part settings); the manifest is one PUT with `If-None-Match: *`; a server that
ignores that header is detected by `check_writable` and refused; `delete_dir` also aborts
unfinished multipart uploads under the folder, which is how the uploads of a killed saver are
cleaned up. Listing reports folders that hold only unfinished uploads for the same reason.

Extra `storage_options` read here (the rest go to `s3fs.S3FileSystem`): `retry_deadline_s`
(60: total time one request may spend on retries), `part_size` (16 MiB), `upload_concurrency`
(4 parts in flight per file), `read_concurrency` (4 ranged GETs in flight per read) and
`read_chunk` (8 MiB per ranged GET).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Sequence

from .base import scratch_name
from .errors import StorageConfigError, StorageUnavailableError
from .retry import RetryPolicy, retry_async
from .s3_errors import is_precondition_failed, is_transient, translate
from .s3_segments import S3SegmentedWriter
from .s3_writer import S3StreamWriter, UploadTarget

log = logging.getLogger("async_ckpt.storage")

CHECK_DEADLINE_S = 10.0   # check_root/check_writable: fail fast on a root that cannot work


@dataclass(frozen=True)
class S3Settings:
    retry_deadline_s: float = 60.0
    part_size: int = 16 << 20
    upload_concurrency: int = 4
    read_concurrency: int = 4
    read_chunk: int = 8 << 20


def open_s3(url: str, storage_options: dict[str, Any] | None) -> "S3Storage":
    """An S3Storage for `s3://bucket[/prefix]`, with our options split from s3fs's."""
    try:
        import s3fs
    except ImportError as exc:
        raise StorageConfigError(f"{url} needs s3fs: pip install 'async_ckpt[s3]'") from exc
    options = dict(storage_options or {})
    ours = {f.name: options.pop(f.name) for f in dataclasses.fields(S3Settings) if f.name in options}
    for name, value in ours.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise StorageConfigError(f"storage_options[{name!r}] must be a positive number, got {value!r}")
    settings = S3Settings(**ours)
    if settings.part_size < 5 << 20:
        raise StorageConfigError(f"storage_options['part_size'] must be at least 5 MiB (S3's minimum "
                                 f"multipart part size), got {settings.part_size}")
    # Retries happen in one place (retry.py) with a bounded total time, not also inside botocore.
    options["config_kwargs"] = {**options.get("config_kwargs", {}), "retries": {"total_max_attempts": 1}}
    options.setdefault("skip_instance_cache", True)   # our config must not leak to the user's s3fs
    options.setdefault("use_listings_cache", False)   # other processes write here too
    rest = url.split("://", 1)[1].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageConfigError(f"{url} names no bucket; use s3://BUCKET[/PREFIX]")
    return S3Storage(s3fs.S3FileSystem(**options), bucket, prefix.strip("/"), settings)


class S3Storage:
    """Storage under `s3://bucket/prefix`; see the module docstring for the protocol on S3."""

    def __init__(self, fs: Any, bucket: str, prefix: str, settings: S3Settings = S3Settings()):
        self.fs, self.bucket, self.prefix, self.settings = fs, bucket, prefix, settings
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint = (fs.endpoint_url or fs.client_kwargs.get("endpoint_url")
                         or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                         or "the default AWS S3 endpoint")
        self.policy = RetryPolicy(deadline_s=settings.retry_deadline_s)
        self._check_policy = RetryPolicy(deadline_s=min(CHECK_DEADLINE_S, settings.retry_deadline_s))

    # -- plumbing -------------------------------------------------------------------------------
    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix and path else (self.prefix or path)

    def _folder_key(self, path: str) -> str:
        key = self.key(path)
        return f"{key}/" if key else ""

    def run(self, coro: Awaitable) -> Any:
        """Run a coroutine on s3fs's event loop thread and wait for it."""
        from fsspec.asyn import sync

        async def wrapper():
            return await coro
        return sync(self.fs.loop, wrapper)

    def start(self, coro: Coroutine) -> "concurrent.futures.Future":
        """Schedule a coroutine on s3fs's event loop thread; its result arrives in the future."""
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    async def call(self, method: str, path: str, *, then: Callable | None = None,
                   policy: RetryPolicy | None = None, tries: list | None = None, **kwargs) -> Any:
        """One S3 request (and `then(response)`, e.g. reading the body), retried as one unit;
        each try appends to `tries` when given."""
        async def once():
            if tries is not None:
                tries.append(1)
            await self.fs.set_session()
            s3 = await self.fs.get_s3(self.bucket)
            fn = getattr(s3, method)
            response = await fn(**self.fs._get_s3_method_kwargs(fn, Bucket=self.bucket, **kwargs))
            return await then(response) if then is not None else response

        try:
            return await retry_async(once, what=f"{method} {self.child_url(path)}",
                                     policy=policy or self.policy, is_transient=is_transient)
        except Exception as exc:
            new = translate(exc, what=method, url=self.child_url(path), endpoint=self.endpoint)
            if new is exc:
                raise
            raise new from exc

    def child_url(self, path: str) -> str:
        return f"{self.url}/{path}" if path else self.url

    # -- setup checks ---------------------------------------------------------------------------
    def check_root(self) -> None:
        """Prove (read-only, in bounded time) that the endpoint answers, the bucket exists and the
        credentials are accepted; raise StorageConfigError saying what to fix otherwise."""
        try:
            self.run(self.call("list_objects_v2", "", policy=self._check_policy,
                               Prefix=self._folder_key(""), MaxKeys=1))
        except StorageUnavailableError as exc:
            raise StorageConfigError(str(exc)) from exc

    def check_writable(self) -> None:
        """Write a probe object exclusively twice: the second write must be refused, or the server
        ignores If-None-Match and a manifest commit could silently replace another one."""
        self.check_root()
        probe = scratch_name("write-probe")
        try:
            self.create_exclusive(probe, b"first", policy=self._check_policy)
            try:
                self.create_exclusive(probe, b"second", policy=self._check_policy)
            except FileExistsError:
                return
            raise StorageConfigError(
                f"the S3 server at {self.endpoint} ignored 'If-None-Match: *' on {self.url}: an "
                "exclusive create replaced an existing object, so two savers could overwrite each "
                "other's manifest; use a server with conditional writes (AWS S3, SeaweedFS, "
                "Ceph RGW >= 16, MinIO)")
        except StorageUnavailableError as exc:
            raise StorageConfigError(str(exc)) from exc
        finally:
            try:
                self.delete(probe)
            except Exception:  # noqa: BLE001 - the probe is harmless garbage; keep the real error
                pass

    # -- writes ---------------------------------------------------------------------------------
    def _target(self, path: str) -> UploadTarget:
        key = self.key(path)

        def request(method: str, **kwargs: Any) -> Coroutine[Any, Any, Any]:
            return self.call(method, path, Key=key, **kwargs)
        return UploadTarget(key, self.child_url(path), self.settings.part_size,
                            self.settings.upload_concurrency, request, self.run, self.start)

    def open_writer(self, path: str) -> S3StreamWriter:
        return S3StreamWriter(self._target(path))

    def open_segmented(self, path: str, capacities: Sequence[int]) -> S3SegmentedWriter:
        """One multipart upload; each segment uploads its own range of parts (s3_segments.py)."""
        return S3SegmentedWriter(self._target(path), capacities)

    def create_exclusive(self, path: str, data: bytes, policy: RetryPolicy | None = None) -> None:
        """One PUT with If-None-Match: * (never a rename). A 412 after a retry may be our own
        earlier try that landed before its answer was lost: then the object holds our bytes."""
        tries: list = []

        async def go():
            try:
                await self.call("put_object", path, policy=policy, tries=tries, Key=self.key(path),
                                Body=bytes(data), IfNoneMatch="*")
            except Exception as exc:  # noqa: BLE001 - a 412 in any of its shapes means "exists"
                if not is_precondition_failed(exc):
                    raise
                if len(tries) > 1 and await self._read(path) == bytes(data):
                    return
                raise FileExistsError(f"{self.child_url(path)} already exists") from exc
        self.run(go())

    def sync_dir(self, path: str) -> None:
        return None   # objects are durable when their PUT/complete returns; no folders to sync

    # -- reads ----------------------------------------------------------------------------------
    async def _read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        kwargs: dict[str, Any] = {}
        if start is not None:
            assert end is not None, "a ranged read needs both ends"
            kwargs["Range"] = f"bytes={start}-{end - 1}"

        async def body(response):
            async with response["Body"] as stream:
                return await stream.read()
        return await self.call("get_object", path, then=body, Key=self.key(path), **kwargs)

    def read_bytes(self, path: str) -> bytes:
        return self.run(self._read(path))

    def read_limited(self, path: str, limit: int) -> bytes:
        """One GET; the body is read only up to `limit + 1` bytes, and not at all when the
        reply's Content-Length says it is larger."""
        url = self.child_url(path)

        async def body(response) -> bytes:
            parts: list[bytes] = []
            got = 0
            async with response["Body"] as stream:   # leaving it releases the connection
                if int(response.get("ContentLength") or 0) > limit:
                    raise OSError(errno.EFBIG, f"{url} holds {response['ContentLength']} bytes, more "
                                               f"than the {limit} an object of its kind may have")
                while got <= limit:
                    chunk = await stream.read(limit + 1 - got)
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
            if got > limit:
                raise OSError(errno.EFBIG, f"{url} holds more than {limit} bytes")
            return b"".join(parts)
        return self.run(self.call("get_object", path, then=body, Key=self.key(path)))

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Fill `out` with concurrent ranged GETs of `read_chunk` bytes each."""
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        chunk = self.settings.read_chunk
        limit = asyncio.Semaphore(self.settings.read_concurrency)

        async def one(lo: int, hi: int) -> None:
            async with limit:
                data = await self._read(path, offset + lo, offset + hi)
            if len(data) != hi - lo:
                if len(data) < hi - lo:
                    raise EOFError(f"{self.child_url(path)} ends before offset {offset} + {len(view)}")
                raise OSError(f"{self.child_url(path)}: asked for {hi - lo} bytes, got {len(data)}")
            view[lo:hi] = data

        async def all_chunks() -> None:
            tasks = [asyncio.ensure_future(one(lo, min(lo + chunk, len(view))))
                     for lo in range(0, len(view), chunk)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
        if len(view):
            self.run(all_chunks())

    def size(self, path: str) -> int:
        return int(self.run(self.call("head_object", path, Key=self.key(path)))["ContentLength"])

    def exists(self, path: str) -> bool:
        try:
            self.size(path)
            return True
        except FileNotFoundError:
            return False

    async def _pages(self, method: str, path: str, **kwargs):
        """Every page of a paginated listing (list_objects_v2 or list_multipart_uploads)."""
        token: dict = {}
        while True:
            page = await self.call(method, path, **kwargs, **token)
            yield page
            if not page.get("IsTruncated"):
                return
            if method == "list_objects_v2":
                token = {"ContinuationToken": page["NextContinuationToken"]}
            else:
                token = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    async def _uploads(self, path: str) -> list[tuple[str, str]]:
        found = []
        async for page in self._pages("list_multipart_uploads", path, Prefix=self._folder_key(path)):
            found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        return found

    def list_dir(self, path: str) -> list[str]:
        """Immediate children of `path`, including folders that so far hold only unfinished
        multipart uploads (a killed saver's), so that cleanup can find them."""
        prefix = self._folder_key(path)

        async def go() -> set[str]:
            names: set[str] = set()
            async for page in self._pages("list_objects_v2", path, Prefix=prefix, Delimiter="/"):
                names.update(p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
            names.update(key[len(prefix):].split("/", 1)[0] for key, _ in await self._uploads(path))
            names.discard("")
            return names
        return sorted(self.run(go()))

    def find_named(self, name: str, max_requests: int) -> list[str] | None:
        """Folders directly under the root holding an object `name` (see base.py), from one
        listing of every key under the root; None if it needs more than `max_requests` pages."""
        prefix = self._folder_key("")

        async def go() -> list[str] | None:
            found, pages = [], 0
            async for page in self._pages("list_objects_v2", "", Prefix=prefix):
                pages += 1
                for obj in page.get("Contents", []):
                    folder, _, rest = obj["Key"][len(prefix):].partition("/")
                    if rest == name and folder:
                        found.append(folder)
                if page.get("IsTruncated") and pages >= max_requests:
                    return None
            return sorted(found)
        return self.run(go()) if max_requests > 0 else None

    # -- unfinished uploads (optional capability, for cleanup tools) -----------------------------
    def list_uploads(self, path: str = "") -> list[str]:
        """Paths (relative to the root) of the unfinished multipart uploads under folder `path`."""
        skip = len(self._folder_key(""))
        return sorted({key[skip:] for key, _ in self.run(self._uploads(path))})

    def abort_uploads(self, path: str) -> int:
        """Abort every unfinished multipart upload of the object at `path` itself; how many."""
        key, folder = self.key(path), path.rpartition("/")[0]

        async def go() -> int:
            found = [u for k, u in await self._uploads(folder) if k == key]
            for upload_id in found:
                try:
                    await self.call("abort_multipart_upload", path, Key=key, UploadId=upload_id)
                except FileNotFoundError:
                    pass   # completed or aborted meanwhile
            return len(found)
        return self.run(go())

    # -- deletes --------------------------------------------------------------------------------
    def delete(self, path: str) -> None:
        self.run(self.call("delete_object", path, Key=self.key(path)))

    def delete_dir(self, path: str) -> None:
        """Abort every unfinished multipart upload under the folder, then delete its objects.
        Best effort like the local backend's rmtree(ignore_errors=True): a failure is logged,
        and what is left stays garbage (never listed: it has no manifest) that the next cleanup
        of the folder removes. The engine calls this from error paths that must not raise."""
        try:
            self._delete_dir(path)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not remove everything under %s (%s); the next cleanup retries",
                        self.child_url(path), exc)

    def _delete_dir(self, path: str) -> None:
        prefix = self._folder_key(path)

        async def go() -> None:
            for key, upload_id in await self._uploads(path):
                try:
                    await self.call("abort_multipart_upload", path, Key=key, UploadId=upload_id)
                except FileNotFoundError:
                    pass   # completed or aborted meanwhile
            keys = []
            async for page in self._pages("list_objects_v2", path, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
                result = await self.call("delete_objects", path, Delete=batch)
                failed = [e for e in result.get("Errors", []) if not is_not_found_code(e)]
                if failed:
                    raise OSError(f"could not delete {len(failed)} objects under {self.child_url(path)}: "
                                  f"{failed[:3]}; check delete permissions and retry")
        self.run(go())


def is_not_found_code(error: dict) -> bool:
    """A per-key error of DeleteObjects that only says the object was gone already."""
    return str(error.get("Code")) in ("NoSuchKey", "404", "NotFound")
