"""What an S3 failure means: the one place that classifies and translates them.

`is_transient` decides what `retry.retry_async` may try again. `translate` turns what is left
into the Storage protocol's builtin errors (FileNotFoundError, FileExistsError, EOFError, OSError)
or, for a root that can never work as configured, into a `StorageConfigError` that names the URL
and the fix, and for transient failures past the retry deadline into a `StorageUnavailableError`
(both from `errors`, both OSErrors). Credentials are never part of a message.
"""
from __future__ import annotations

import asyncio
import errno
import socket

from .errors import StorageConfigError, StorageUnavailableError
from .retry import RetriesExhausted

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                    "RequestLimitExceeded", "OperationAborted", "XAmzContentSHA256Mismatch"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
               "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "403"}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchUpload", "404", "NotFound"}


def _status(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_connection_error(exc: BaseException) -> bool:
    import aiohttp
    import botocore.exceptions as bex

    return isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError,
                            bex.ProxyConnectionError, aiohttp.ClientConnectorError,
                            ConnectionRefusedError, socket.gaierror))


def is_transient(exc: BaseException) -> bool:
    """True for failures that may pass by themselves: 5xx, throttling, timeouts, resets."""
    import aiohttp
    import botocore.exceptions as bex
    from botocore.parsers import ResponseParserError

    code, status = _status(exc)
    if code or status:
        return status >= 500 or code in _TRANSIENT_CODES
    # A throttling reply with a broken XML body surfaces as a parser error (s3fs issue 484).
    return isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError,
                            ResponseParserError, aiohttp.ClientError, asyncio.TimeoutError,
                            ConnectionError, socket.timeout, TimeoutError))


def is_precondition_failed(exc: BaseException) -> bool:
    """A 412 on a conditional write: AWS and moto say so in a ClientError whose body names the
    If-None-Match condition, SeaweedFS and Ceph send a bare PreconditionFailed; both mean the
    object already exists. (s3fs turns the first into FileExistsError, the second into OSError.)"""
    if isinstance(exc, FileExistsError):
        return True
    code, status = _status(exc)
    return status == 412 or code == "PreconditionFailed" or (
        isinstance(exc, OSError) and "PreconditionFailed" in str(exc))


def is_not_found(exc: BaseException) -> bool:
    code, status = _status(exc)
    return code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket")


def translate(exc: BaseException, *, what: str, url: str, endpoint: str) -> BaseException:
    """The exception to raise instead of `exc` (raised by `what` on `url`)."""
    import botocore.exceptions as bex

    if isinstance(exc, RetriesExhausted):
        last = exc.last
        if _is_connection_error(last):
            return StorageUnavailableError(
                f"cannot reach the S3 endpoint {endpoint} for {url} ({what}; {exc.attempts} tries in "
                f"{exc.elapsed_s:.1f} s: {last!r}); check storage_options['endpoint_url'] and that "
                "the server is running and reachable from this machine")
        return StorageUnavailableError(
            f"{what} on {url} kept failing with transient errors ({exc.attempts} tries in "
            f"{exc.elapsed_s:.1f} s, last: {last!r}); the S3 service at {endpoint} is overloaded "
            "or down: retry later or raise storage_options['retry_deadline_s']")
    if isinstance(exc, bex.NoCredentialsError):
        return StorageConfigError(
            f"no S3 credentials for {url}: pass storage_options={{'key': ..., 'secret': ...}} or "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an AWS profile)")
    code, status = _status(exc)
    message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", "")) or str(exc)
    if code == "NoSuchBucket":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return StorageConfigError(
            f"the bucket {bucket!r} of {url} does not exist at {endpoint}; create it first "
            "(async_ckpt never creates buckets) or fix the root URL / endpoint_url")
    if code in _AUTH_CODES or status == 403:
        return StorageConfigError(
            f"S3 refused {what} on {url} ({code or status}: {message}); check the credentials "
            "(storage_options key/secret/token or the AWS_* environment) and that they may list, "
            "read, write and delete under this prefix")
    if is_precondition_failed(exc):
        return FileExistsError(errno.EEXIST, f"{url} already exists")
    if code == "InvalidRange" or status == 416:
        return EOFError(f"{url} ends before the requested range ({what})")
    if is_not_found(exc):
        return FileNotFoundError(errno.ENOENT, f"{url} does not exist ({what})")
    if code or status:
        return OSError(errno.EIO, f"S3 {what} on {url} failed: {code or status}: {message}")
    return exc
