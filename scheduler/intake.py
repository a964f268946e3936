"""Submission: stream the audio into the object store while hashing it, then create (or find) the job."""

import hashlib
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator

from cache.store import ObjectStore

from .job import Job, JobSpec
from .queue import JobQueue

log = logging.getLogger(__name__)


class UploadTooLarge(Exception):
    """The audio exceeds the size limit; nothing was stored."""

    code = "payload_too_large"
    status = 413


def new_job_id() -> str:
    return secrets.token_hex(8)


class Digest:
    """Passes chunks through while counting and hashing them, enforcing ``limit`` bytes."""

    def __init__(self, chunks: AsyncIterable[bytes], limit: int) -> None:
        self.chunks = chunks
        self.limit = limit
        self.size = 0
        self.sha256 = hashlib.sha256()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            self.size += len(chunk)
            if self.size > self.limit:
                raise UploadTooLarge(f"upload exceeds the limit of {self.limit} bytes (api.max_upload_bytes)")
            self.sha256.update(chunk)
            yield chunk


class Intake:
    """Turns incoming audio into jobs. Used by the API, the CLI's in-process node and drop folders."""

    def __init__(self, queue: JobQueue, store: ObjectStore, max_bytes: int) -> None:
        self.queue = queue
        self.store = store
        self.max_bytes = max_bytes

    async def submit(
        self,
        chunks: AsyncIterable[bytes],
        *,
        filename: str,
        model: str,
        language: str,
        job_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """Stores the audio and creates the job; returns (job, created).

        A repeated id or idempotency key returns the existing job and stores nothing.
        """
        known = await self.queue.existing(job_id, idempotency_key)
        if known is not None:
            return known, False
        key = f"audio/{secrets.token_hex(12)}"
        digest = Digest(chunks, self.max_bytes)
        await self.store.put_stream(key, digest)
        spec = JobSpec(
            id=job_id or new_job_id(), source=key, model=model, language=language, filename=filename,
            size=digest.size, sha256=digest.sha256.hexdigest(),
        )
        try:
            job, created = await self.queue.submit(spec, idempotency_key=idempotency_key)
        except BaseException:
            await self.store.delete(key)
            raise
        if not created or job.cached:  # a concurrent duplicate won, or the transcript already exists
            await self.store.delete(key)
        return job, created

    def __repr__(self) -> str:
        return f"Intake(max_bytes={self.max_bytes})"
