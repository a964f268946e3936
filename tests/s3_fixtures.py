"""Fixtures for a real S3 endpoint: moto's standalone server on a free loopback port (MinIO's server cannot be
installed from the registries these machines reach; moto speaks the same HTTP API, SigV4 and multipart).

- ``moto_s3`` (session): the server, started once, stopped at the end of the session.
- ``moto_s3_auth`` (session, started only when a test asks): a second server that checks credentials
  (``INITIAL_NO_AUTH_ACTION_COUNT=0``), so any key pair we send is refused like a wrong one on MinIO.
- ``s3_env``: test credentials in the environment, where the standard AWS chain finds them.
- ``s3_bucket``: a fresh, uniquely named bucket on ``moto_s3``, emptied and removed afterwards.
"""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiobotocore.session import AioSession
from botocore.config import Config

from tests.server_fixtures import free_port

#: Seconds moto's server gets to answer its first request (it imports every AWS service on start).
MOTO_START_TIMEOUT = 30.0
#: The credentials and region every S3 test runs with.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class MotoServer:
    """A moto standalone server process on 127.0.0.1."""

    endpoint: str
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, extra_env: dict[str, str] | None = None) -> "MotoServer":
        port = free_port()
        env = {**os.environ, **TEST_CREDENTIALS, **(extra_env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        server = cls(f"http://127.0.0.1:{port}", process)
        try:
            server._wait()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait(self) -> None:
        """Until the server answers HTTP (any status: the auth-checking one answers 403)."""
        deadline = time.monotonic() + MOTO_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode} on start")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"moto server at {self.endpoint} did not answer within {MOTO_START_TIMEOUT}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoServer]:
    server = MotoServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3_auth() -> Iterator[MotoServer]:
    """A moto server that authenticates every request against its (empty) IAM: all credentials are refused."""
    server = MotoServer.start({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield server
    server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Test credentials for the standard AWS chain; shared config files and instance metadata kept out."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return dict(TEST_CREDENTIALS)


def s3_client(endpoint: str) -> Any:
    """A plain aiobotocore client on ``endpoint`` (an async context manager), to check what a test left behind."""
    return AioSession().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
async def s3_bucket(moto_s3: MotoServer, s3_env: dict[str, str]) -> AsyncIterator[tuple[str, str]]:
    """``(endpoint, bucket)``: a fresh bucket, with its objects and pending uploads removed afterwards."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    async with s3_client(moto_s3.endpoint) as client:
        await client.create_bucket(Bucket=bucket)
    yield moto_s3.endpoint, bucket
    async with s3_client(moto_s3.endpoint) as client:
        for upload in (await client.list_multipart_uploads(Bucket=bucket)).get("Uploads", []):
            await client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for obj in (await client.list_objects_v2(Bucket=bucket)).get("Contents", []):
            await client.delete_object(Bucket=bucket, Key=obj["Key"])
        await client.delete_bucket(Bucket=bucket)
