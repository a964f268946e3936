"""S3Store against a real S3 endpoint (moto's standalone server), plus stub servers for error mapping."""

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

import cache.s3
from cache.errors import InvalidKey, ObjectNotFound, StoreError
from cache.s3 import (
    BucketNotFound,
    S3Store,
    StorageAuthFailed,
    StorageUnreachable,
    parse_storage_url,
)
from tests.s3_fixtures import MotoServer, s3_client
from tests.server_fixtures import free_port

MiB = 1 << 20
#: S3's minimum part size: the smallest that still makes real multipart uploads.
PART = 5 * MiB

StoreFactory = Callable[..., Awaitable[S3Store]]


@pytest.fixture
async def make_store(s3_bucket: tuple[str, str]) -> AsyncIterator[StoreFactory]:
    """Started stores on the test's bucket (keyword arguments override), all closed afterwards."""
    endpoint, bucket = s3_bucket
    stores: list[S3Store] = []

    async def make(**kwargs: object) -> S3Store:
        args: dict[str, object] = {"bucket": bucket, "endpoint_url": endpoint, "part_size": PART}
        args.update(kwargs)
        store = S3Store(**args)  # type: ignore[arg-type]
        stores.append(store)
        await store.start()
        return store

    yield make
    for store in stores:
        await store.close()


def payload(size: int) -> bytes:
    return os.urandom(size)


async def chunked(data: bytes, chunk: int = MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i:i + chunk]
        await asyncio.sleep(0)  # a real source (a socket) yields to the loop between chunks


async def pending_uploads(endpoint: str, bucket: str) -> list[dict[str, object]]:
    async with s3_client(endpoint) as client:
        uploads: list[dict[str, object]] = (await client.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
        return uploads


async def raw_keys(endpoint: str, bucket: str) -> list[str]:
    async with s3_client(endpoint) as client:
        return [o["Key"] for o in (await client.list_objects_v2(Bucket=bucket)).get("Contents", [])]


# -- the happy paths ---------------------------------------------------------------------------------------


async def test_put_stream_get_bytes_round_trip(make_store: StoreFactory, s3_bucket: tuple[str, str]) -> None:
    store = await make_store(prefix="/node-objects/")
    data = payload(300_000)

    assert await store.put_stream("audio/job-1", chunked(data, 65_536)) == len(data)

    assert await store.get_bytes("audio/job-1") == data
    assert store.local_path("audio/job-1") is None
    assert await raw_keys(*s3_bucket) == ["node-objects/audio/job-1"]
    assert store.puts == 1 and store.gets == 1 and store.multipart == 0
    assert "puts=1" in repr(store) and "gets=1" in repr(store)


async def test_put_bytes_and_empty_object(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_bytes("transcripts/a.json", b'{"text": "hello"}')
    await store.put_bytes("transcripts/empty", b"")

    assert await store.get_bytes("transcripts/a.json") == b'{"text": "hello"}'
    assert await store.get_bytes("transcripts/empty") == b""


async def test_multipart_upload_with_parallel_parts(make_store: StoreFactory, s3_bucket: tuple[str, str]) -> None:
    """~12 MiB in 5 MiB parts: three parts (5 + 5 + 2), two in flight at once, never more."""
    store = await make_store(parallel_parts=2)
    data = payload(12 * MiB + 12345)

    assert await store.put_stream("audio/big", chunked(data)) == len(data)

    assert (store.multipart, store.parts, store.puts) == (1, 3, 1)
    assert store.max_in_flight == 2  # parallel, and bounded by parallel_parts
    async with s3_client(s3_bucket[0]) as client:
        head = await client.head_object(Bucket=s3_bucket[1], Key="audio/big")
    # A multipart object's ETag is the MD5 of its parts' MD5s with the part count appended.
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(data)
    assert await store.get_bytes("audio/big") == data
    assert await pending_uploads(*s3_bucket) == []


async def test_put_file_in_parts(make_store: StoreFactory, tmp_path: Path) -> None:
    store = await make_store()
    src = tmp_path / "in.wav"
    data = payload(2 * PART + 1)
    src.write_bytes(data)

    assert await store.put_file("audio/file", src) == len(data)

    assert store.parts == 3
    assert await store.get_bytes("audio/file") == data


async def test_fetch_streams_to_a_file(make_store: StoreFactory, tmp_path: Path) -> None:
    store = await make_store()
    data = payload(3 * MiB + 7)
    await store.put_bytes("audio/x", data)
    dest = tmp_path / "x.wav"

    assert await store.fetch("audio/x", dest) == dest

    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]  # the temp file was renamed, not left


async def test_exists_and_delete(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.put_bytes("audio/d", b"x")
    assert await store.exists("audio/d")

    await store.delete("audio/d")
    await store.delete("audio/d")  # deleting a missing object is not an error

    assert not await store.exists("audio/d")


# -- failures ----------------------------------------------------------------------------------------------


async def test_failing_source_leaves_no_object_and_no_pending_upload(
    make_store: StoreFactory, s3_bucket: tuple[str, str]
) -> None:
    """1. A source yields 6 MiB (one part starts uploading), then raises.
    2. The source's own error reaches the caller unchanged.
    3. No object under the key, no multipart upload pending in the bucket."""
    store = await make_store()

    async def source() -> AsyncIterator[bytes]:
        yield payload(6 * MiB)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await store.put_stream("audio/partial", source())

    assert store.multipart == 1 and store.aborts == 1
    assert not await store.exists("audio/partial")
    assert await pending_uploads(*s3_bucket) == []


async def test_cancelled_upload_is_aborted(make_store: StoreFactory, s3_bucket: tuple[str, str]) -> None:
    """1. A source yields 6 MiB, then stalls (a slow client).
    2. The upload task is cancelled while the multipart upload is open.
    3. The upload is aborted: nothing pending, no object."""
    store = await make_store()
    stalled = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield payload(6 * MiB)
        stalled.set()
        await asyncio.Event().wait()
        yield b""  # never reached

    task = asyncio.create_task(store.put_stream("audio/cancelled", source()))
    await asyncio.wait_for(stalled.wait(), 10)
    assert len(await pending_uploads(*s3_bucket)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert store.aborts == 1
    assert await pending_uploads(*s3_bucket) == []
    assert not await store.exists("audio/cancelled")


async def test_missing_object(make_store: StoreFactory, tmp_path: Path) -> None:
    store = await make_store()

    with pytest.raises(ObjectNotFound) as info:
        await store.get_bytes("audio/nothing")
    assert info.value.code == "object_not_found" and "audio/nothing" in str(info.value)
    with pytest.raises(ObjectNotFound):
        await store.fetch("audio/nothing", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


async def test_invalid_keys_are_refused(make_store: StoreFactory) -> None:
    store = await make_store()
    for key in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(InvalidKey):
            await store.put_bytes(key, b"x")


async def test_missing_bucket_fails_start(moto_s3: MotoServer, s3_env: dict[str, str]) -> None:
    store = S3Store("no-such-bucket", endpoint_url=moto_s3.endpoint)

    with pytest.raises(BucketNotFound) as info:
        await store.start()

    message = str(info.value)
    assert info.value.code == "bucket_not_found"
    assert "no-such-bucket" in message and moto_s3.endpoint in message and "create it" in message
    await store.close()  # safe after a failed start


async def test_refused_credentials_fail_start(moto_s3_auth: MotoServer, s3_env: dict[str, str]) -> None:
    """moto's server with authentication on (INITIAL_NO_AUTH_ACTION_COUNT=0) knows no access keys, so it
    refuses ours with 403, as MinIO refuses a wrong key pair."""
    store = S3Store("some-bucket", endpoint_url=moto_s3_auth.endpoint)

    with pytest.raises(StorageAuthFailed) as info:
        await store.start()

    assert info.value.code == "storage_auth_failed"
    assert "AWS_ACCESS_KEY_ID" in str(info.value) and "AWS_SECRET_ACCESS_KEY" in str(info.value)
    await store.close()


async def test_missing_credentials_fail_start(
    moto_s3: MotoServer, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store("some-bucket", endpoint_url=moto_s3.endpoint)

    with pytest.raises(StorageAuthFailed, match="AWS_ACCESS_KEY_ID"):
        await store.start()
    await store.close()


async def test_403_error_body_maps_to_auth_failed(s3_env: dict[str, str]) -> None:
    """A stub endpoint accepts HeadBucket but answers GetObject with 403 SignatureDoesNotMatch (a wrong
    secret key on MinIO): the error carries the server's code and says which variables to set."""

    async def handler(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response(status=200)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code>'
            "<Message>The request signature we calculated does not match the signature you provided."
            "</Message></Error>"
        )
        return web.Response(status=403, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    store = S3Store("some-bucket", endpoint_url=f"http://127.0.0.1:{port}")
    try:
        await store.start()
        with pytest.raises(StorageAuthFailed, match="SignatureDoesNotMatch") as info:
            await store.get_bytes("audio/x")
        assert "AWS_SECRET_ACCESS_KEY" in str(info.value)
    finally:
        await store.close()
        await runner.cleanup()


async def test_unreachable_endpoint_fails_start_quickly(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One attempt: the retries' backoff is botocore's, not what is under test here.
    monkeypatch.setattr(cache.s3, "MAX_ATTEMPTS", 1)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("some-bucket", endpoint_url=endpoint)

    started = time.monotonic()
    with pytest.raises(StorageUnreachable) as info:
        await store.start()

    assert time.monotonic() - started < 5
    assert info.value.code == "storage_unreachable" and endpoint in str(info.value)
    await store.close()


async def test_close_is_idempotent(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.close()
    await store.close()

    with pytest.raises(StoreError, match="not started"):
        await store.get_bytes("audio/x")
    await S3Store("never-started").close()


# -- configuration -----------------------------------------------------------------------------------------


def test_parse_storage_url() -> None:
    assert parse_storage_url("s3://audio-bucket") == ("audio-bucket", "")
    assert parse_storage_url("s3://audio-bucket/") == ("audio-bucket", "")
    assert parse_storage_url("s3://audio-bucket/v2t/prod/") == ("audio-bucket", "v2t/prod")
    for bad in ("http://bucket/x", "s3://", "s3:///prefix", "s3://Bucket_Upper", "s3://ab",
                "s3://key:secret@bucket", "s3://bucket:9000/x", "s3://bucket/a//b", "s3://bucket/../x",
                "s3://bucket/x?versionId=1", "bucket/prefix"):
        with pytest.raises(ValueError):
            parse_storage_url(bad)


def test_constructor_checks_part_size_and_does_no_io() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Store("bucket", part_size=MiB)
    with pytest.raises(ValueError, match="parallel_parts"):
        S3Store("bucket", parallel_parts=0)
    store = S3Store("bucket", "pre/fix", endpoint_url="http://127.0.0.1:9")  # nothing is contacted
    assert "s3://bucket/pre/fix" in repr(store)
