"""The object store on any S3-compatible endpoint (MinIO, AWS S3, Ceph RGW, moto), through aiobotocore.

The code is endpoint-agnostic: with an ``endpoint_url`` it uses path-style addressing (what MinIO and Ceph
expect), without one it talks to AWS. Credentials come only from the standard AWS chain (``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and the shared files, instance metadata); they are never passed
as arguments, so they never end up in config files, logs or reprs.

Nothing is held whole in memory except by ``get_bytes``: uploads stream in parts of ``part_size`` bytes with at
most ``parallel_parts`` in flight, downloads stream to a temporary file that is renamed into place. An upload
that fails or is cancelled aborts its multipart upload, so an object is visible whole under its key or not at all.
"""

import asyncio
import contextlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .errors import ObjectNotFound, StoreError
from .store import check_key, file_chunks, one_chunk

log = logging.getLogger(__name__)

MiB = 1 << 20

#: Default size of one multipart part; also the threshold below which an object is one PutObject.
PART_SIZE = 64 * MiB
#: S3's smallest allowed part (except the last); MinIO and Ceph enforce it too.
MIN_PART_SIZE = 5 * MiB
#: S3's largest allowed part.
MAX_PART_SIZE = 5 * 1024 * MiB
#: S3's limit on the number of parts in one multipart upload.
MAX_PARTS = 10_000
#: Default number of part uploads in flight for one object.
PARALLEL_PARTS = 4
#: Bytes requested from a response body per read, and gathered before one write to disk (in a thread).
DOWNLOAD_CHUNK = 1 * MiB
#: Attempts per request, the first included (botocore's "standard" retry mode: throttling, 5xx, resets).
#: Three attempts ride out a restarting MinIO without hiding a wrong endpoint for long at node start.
MAX_ATTEMPTS = 3
#: Seconds to open a connection; a wrong host should fail the node's start, not hang it.
CONNECT_TIMEOUT = 10.0
#: Seconds without a byte from the server before a request is abandoned (and retried).
READ_TIMEOUT = 60.0
#: Pooled connections of the one client: several objects, each with ``parallel_parts`` parts, at once.
MAX_POOL_CONNECTIONS = 32

#: Error codes (S3 and its clones) that mean the credentials were refused rather than anything else.
AUTH_ERROR_CODES = frozenset({
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed", "AllAccessDisabled",
})
#: What to tell an operator whose credentials are missing or refused.
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with a shared credentials file) "
    "in the node's environment, for a user allowed to read and write the bucket"
)

# S3's bucket naming rules (3-63 characters: lowercase letters, digits, dots, hyphens; alphanumeric at both
# ends). MinIO enforces the same, so a bad name is rejected at config time rather than at the first request.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# What the client raises besides ClientError (the server's answer): its own errors (credentials, connection,
# a cut transfer), aiohttp errors that reach a body read unwrapped, and timeouts.
_CLIENT_ERRORS = (BotoCoreError, aiohttp.ClientError, TimeoutError)


class BucketNotFound(StoreError):
    """The configured bucket does not exist on the endpoint."""

    code = "bucket_not_found"
    status = 503
    # Retrying a job does not create the bucket; an operator has to.
    retryable = False


class StorageAuthFailed(StoreError):
    """The object store refused the credentials, or no credentials were found."""

    code = "storage_auth_failed"
    status = 503
    # Temporary credentials refresh and another node may hold good ones: worth another attempt.
    retryable = True


class StorageUnreachable(StoreError):
    """The object store's endpoint could not be reached (refused, timed out, connection dropped)."""

    code = "storage_unreachable"
    status = 503
    retryable = True


def parse_storage_url(url: str) -> tuple[str, str]:
    """Splits ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``; the prefix may be empty.

    Raises ValueError, naming what is wrong, for anything else (other schemes, credentials or a port in the
    URL, a bad bucket name, ``.``/``..`` or empty segments in the prefix, a query or fragment).
    """
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"storage URL {url!r} must start with s3:// (s3://bucket/optional/prefix)")
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {url!r} must not have a query or fragment")
    bucket = parts.netloc
    if "@" in bucket or ":" in bucket:
        raise ValueError(
            f"storage URL {url!r} must name only the bucket: put the endpoint in storage.endpoint and "
            "credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"storage URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots or hyphens)"
        )
    prefix = parts.path.strip("/")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise ValueError(f"storage URL {url!r} has an empty, '.' or '..' segment in its prefix")
    return bucket, prefix


class S3Store:
    """Objects in one bucket (under an optional key prefix) of an S3-compatible object store."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = PART_SIZE,
        parallel_parts: int = PARALLEL_PARTS,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes, not {part_size}")
        if parallel_parts < 1:
            raise ValueError(f"parallel_parts must be at least 1, not {parallel_parts}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.part_size = part_size
        self.parallel_parts = parallel_parts
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        # Counters (see __repr__).
        self.puts = 0
        self.gets = 0
        self.multipart = 0
        self.parts = 0
        self.aborts = 0
        #: The most part uploads seen in flight at once, over all uploads: never above ``parallel_parts`` for
        #: one object, which is what bounds an upload's memory to ``parallel_parts + 1`` part buffers.
        self.max_in_flight = 0

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the pooled client and checks the bucket (HeadBucket), so misconfiguration fails here."""
        if self._client is not None:
            return
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            max_pool_connections=max(MAX_POOL_CONNECTIONS, 2 * self.parallel_parts),
            # MinIO and Ceph are addressed by path; AWS prefers virtual hosts and redirects by itself.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            # botocore >= 1.36 adds CRC checksums to every upload by default, which several S3 clones reject
            # or mishandle in multipart uploads; send and check them only where the API requires them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = contextlib.AsyncExitStack()
        try:
            try:
                self._client = await stack.enter_async_context(
                    AioSession().create_client("s3", region_name=self.region, endpoint_url=self.endpoint_url,
                                               config=config)
                )
            except ValueError as e:  # botocore's check of the endpoint URL and region names
                raise StoreError(f"invalid object store endpoint or region ({e}): check storage.endpoint "
                                 "and storage.region") from e
            self._stack = stack
            await self._call("head_bucket", None, Bucket=self.bucket)
        except BaseException:
            # Safe after a failed start: nothing stays open.
            self._client = None
            self._stack = None
            await stack.aclose()
            raise
        log.info("object store %s ready", self._where())

    async def close(self) -> None:
        """Closes the client and its connection pool; idempotent, safe after a failed start."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- keys and errors -----------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _endpoint(self) -> str:
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return self.endpoint_url or f"AWS S3 ({self.region or 'default region'})"

    def _where(self) -> str:
        prefix = f"/{self.prefix}" if self.prefix else ""
        return f"s3://{self.bucket}{prefix} at {self._endpoint()}"

    def _client_or_raise(self) -> Any:
        if self._client is None:
            raise StoreError(f"the object store s3://{self.bucket} is not started (or already closed)")
        return self._client

    def _translate(self, e: Exception, op: str, key: str | None) -> StoreError:
        """Turns a botocore/aiohttp failure into one of the store's errors, with a message an operator can act on."""
        what = f"{op} {key!r}" if key is not None else op
        if isinstance(e, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return StorageAuthFailed(f"no usable credentials for the object store at {self._endpoint()} ({e}): "
                                     f"{CREDENTIALS_HINT}")
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = err.get("Message") or code
            if code == "NoSuchBucket" or (op == "head_bucket" and (code == "404" or status == 404)):
                return BucketNotFound(
                    f"bucket {self.bucket!r} does not exist at {self._endpoint()}: create it (for example "
                    f"`mc mb ALIAS/{self.bucket}` or `aws s3 mb s3://{self.bucket}`) or fix storage.url"
                )
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectNotFound(f"no object {key!r} in {self._where()}")
            if code in AUTH_ERROR_CODES or status in (401, 403):
                return StorageAuthFailed(
                    f"the object store at {self._endpoint()} refused {what} on bucket {self.bucket!r} "
                    f"({code}: {message}): {CREDENTIALS_HINT}"
                )
            return StoreError(f"object store error on {what} in {self._where()}: {code} ({status}): {message}")
        if isinstance(e, (BotoConnectionError, HTTPClientError, aiohttp.ClientError, TimeoutError)):
            return StorageUnreachable(
                f"cannot reach the object store at {self._endpoint()} ({what}: {e}); "
                "check storage.endpoint and that the server is running"
            )
        return StoreError(f"object store error on {what} in {self._where()}: {e}")

    async def _call(self, op: str, key: str | None, **params: Any) -> Any:
        """One API call with errors translated; ``key`` (the caller's, unprefixed) only names it in messages."""
        client = self._client_or_raise()
        try:
            return await getattr(client, op)(**params)
        except (ClientError, *_CLIENT_ERRORS) as e:
            raise self._translate(e, op, key) from e

    # -- writes --------------------------------------------------------------------------------------------

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Streams ``chunks`` to ``key``; returns the size. Errors of ``chunks`` itself propagate unchanged.

        Below ``part_size`` the object is one PutObject; from there on a multipart upload with up to
        ``parallel_parts`` parts in flight, aborted on any error or cancellation.
        """
        full = self._key(key)
        self._client_or_raise()
        part_size = self.part_size
        buf = bytearray()
        size = 0
        upload: _Multipart | None = None
        try:
            async for chunk in chunks:
                size += len(chunk)
                view = memoryview(chunk)
                # Fill the part buffer exactly to part_size, so parts need no re-slicing (one copy per byte).
                while view:
                    take = part_size - len(buf)
                    buf += view[:take]
                    view = view[take:]
                    if len(buf) == part_size:
                        if upload is None:
                            upload = _Multipart(self, key, full)
                            await upload.begin()
                        await upload.add(buf)
                        buf = bytearray()
            if upload is None:
                await self._call("put_object", key, Bucket=self.bucket, Key=full, Body=bytes(buf))
            else:
                if buf:
                    await upload.add(buf)
                buf = bytearray()
                await upload.complete()
        except BaseException:
            if upload is not None:
                await upload.abort()
            raise
        self.puts += 1
        return size

    async def put_file(self, key: str, path: Path) -> int:
        """Uploads a local file (read in a thread, part by part); returns its size."""
        return await self.put_stream(key, file_chunks(path, self.part_size))

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Writes ``data`` under ``key`` (multipart when it is large, like any stream)."""
        await self.put_stream(key, one_chunk(data))

    # -- reads ---------------------------------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes:
        """The whole object in memory: for small things (transcripts); use ``fetch`` for audio."""
        resp = await self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))
        try:
            async with resp["Body"] as body:
                data: bytes = await body.read()
        except _CLIENT_ERRORS as e:
            raise self._translate(e, "get_object", key) from e
        self.gets += 1
        return data

    async def fetch(self, key: str, dest: Path) -> Path:
        """Streams the object into the file ``dest`` (whole or not at all: a temp file renamed into place)."""
        resp = await self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        f: IO[bytes] | None = None
        try:
            async with resp["Body"] as body:
                f = await asyncio.to_thread(open, tmp, "wb")
                batch = bytearray()
                # read() checks the length against Content-Length at the end: a cut transfer raises.
                async for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                    batch += chunk
                    if len(batch) >= DOWNLOAD_CHUNK:
                        await asyncio.to_thread(f.write, batch)
                        batch = bytearray()
                if batch:
                    await asyncio.to_thread(f.write, batch)
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(os.replace, tmp, dest)
        except BaseException as e:
            if f is not None:
                f.close()
            tmp.unlink(missing_ok=True)
            if isinstance(e, _CLIENT_ERRORS):
                raise self._translate(e, "get_object", key) from e
            raise
        self.gets += 1
        return dest

    async def stream_url(self, url: str) -> AsyncIterator[bytes]:
        """The object at ``s3://BUCKET/KEY`` (any bucket this store's endpoint and credentials can read), as
        chunks: for submissions that name audio already in object storage."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ObjectNotFound(f"{url}: expected s3://BUCKET/KEY")
        resp = await self._call("get_object", url, Bucket=bucket, Key=key)
        try:
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                    yield chunk
        except _CLIENT_ERRORS as e:
            raise self._translate(e, "get_object", url) from e

    def local_path(self, key: str) -> Path | None:
        """Always None: nothing of a remote store is on local disk (callers then ``fetch``)."""
        return None

    async def delete(self, key: str) -> None:
        """Removes the object; a missing one is not an error (as in S3 itself)."""
        await self._call("delete_object", key, Bucket=self.bucket, Key=self._key(key))

    async def exists(self, key: str) -> bool:
        try:
            await self._call("head_object", key, Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def __repr__(self) -> str:
        return (
            f"S3Store({self._where()!r}, puts={self.puts}, gets={self.gets}, multipart={self.multipart}, "
            f"parts={self.parts}, aborts={self.aborts})"
        )


class _Multipart:
    """One multipart upload in progress: parts uploaded in parallel tasks, owned here and cancelled on abort."""

    def __init__(self, store: S3Store, key: str, full_key: str) -> None:
        self.store = store
        self.key = key
        self.full_key = full_key
        self.upload_id: str | None = None
        self.in_flight: set[asyncio.Task[None]] = set()
        self.etags: dict[int, str] = {}
        self.next_part = 1

    async def begin(self) -> None:
        resp = await self.store._call("create_multipart_upload", self.key, Bucket=self.store.bucket,
                                      Key=self.full_key)
        self.upload_id = resp["UploadId"]
        self.store.multipart += 1

    async def add(self, data: bytearray) -> None:
        """Starts uploading one part; first waits for a free slot, which is what bounds memory."""
        while len(self.in_flight) >= self.store.parallel_parts:
            done, _ = await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
            self._reap(done)
        # Fail early: a part that already failed makes reading more of the source pointless.
        self._reap({t for t in self.in_flight if t.done()})
        if self.next_part > MAX_PARTS:
            raise StoreError(
                f"{self.key!r} is larger than {MAX_PARTS} parts of {self.store.part_size} bytes: "
                "raise storage.part_size"
            )
        task = asyncio.create_task(self._upload(self.next_part, data), name=f"s3-part-{self.next_part}")
        self.next_part += 1
        self.in_flight.add(task)
        self.store.max_in_flight = max(self.store.max_in_flight, len(self.in_flight))

    def _reap(self, done: set[asyncio.Task[None]]) -> None:
        for task in done:
            self.in_flight.discard(task)
            task.result()  # raises the part's error

    async def _upload(self, number: int, data: bytearray) -> None:
        resp = await self.store._call("upload_part", self.key, Bucket=self.store.bucket, Key=self.full_key,
                                      UploadId=self.upload_id, PartNumber=number, Body=data)
        self.etags[number] = resp["ETag"]
        self.store.parts += 1

    async def complete(self) -> None:
        while self.in_flight:
            done, _ = await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
            self._reap(done)
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(self.etags.items())]
        await self.store._call("complete_multipart_upload", self.key, Bucket=self.store.bucket, Key=self.full_key,
                               UploadId=self.upload_id, MultipartUpload={"Parts": parts})

    async def abort(self) -> None:
        """Cancels the part uploads and aborts the upload, so no partial object or stored parts remain.

        Runs while the caller's error (or cancellation) propagates: its own failure is logged, never raised,
        so the original error is what the caller sees.
        """
        for task in self.in_flight:
            task.cancel()
        await asyncio.gather(*self.in_flight, return_exceptions=True)
        self.in_flight.clear()
        if self.upload_id is None:
            return
        try:
            await self.store._call("abort_multipart_upload", self.key, Bucket=self.store.bucket,
                                   Key=self.full_key, UploadId=self.upload_id)
            self.store.aborts += 1
        except StoreError as e:
            log.warning("could not abort the multipart upload of %r (%s); the bucket's lifecycle rule for "
                        "incomplete uploads will remove its parts", self.key, e)
