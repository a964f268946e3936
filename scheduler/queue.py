"""The submitting side of the work stream: create, look up, list and cancel jobs."""

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from . import scripts
from .errors import InvalidJob, JobConflict, JobNotFound, TranscriptNotReady
from .job import JOB_ID, Job, JobSpec, from_hash, now, text
from .keys import GROUP, Keys
from .settings import JobSettings

log = logging.getLogger(__name__)


async def ensure_group(redis: aioredis.Redis, keys: Keys) -> None:
    """Creates the stream and its consumer group unless they exist."""
    try:
        await redis.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


class JobQueue:
    """Jobs as the API sees them. Holds no state of its own: everything lives in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: JobSettings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._create = redis.register_script(scripts.CREATE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self.submitted = 0
        self.cache_hits = 0

    async def start(self) -> None:
        await ensure_group(self.redis, self.keys)

    async def close(self) -> None:
        """Nothing to release: the Redis client belongs to the node."""

    async def find(self, job_id: str) -> Job | None:
        """The job, or None if there is none with that id."""
        h = await self.redis.hgetall(self.keys.job(job_id))
        return from_hash(job_id, h) if h else None

    async def get(self, job_id: str) -> Job:
        job = await self.find(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept {self.settings.result_ttl:.0f} s)")
        return job

    async def existing(self, job_id: str | None, idempotency_key: str | None) -> Job | None:
        """The job a repeated submission refers to, if any (checked before uploading anything)."""
        if idempotency_key:
            known = await self.redis.get(self.keys.idempotency(idempotency_key))
            if known:
                return await self.find(text(known))
        if job_id:
            return await self.find(job_id)
        return None

    async def cached_result(self, spec: JobSpec) -> Job | None:
        """A completed job that transcribed the same audio with the same model and options."""
        ref = await self.redis.get(self.keys.result(spec.sha256, spec.model, spec.options))
        if not ref:
            return None
        job = await self.find(text(ref))
        return job if job is not None and job.state == "completed" else None

    async def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Creates the job and queues it, or completes it at once from the result cache.

        Returns the job and whether it was created (False: the id or idempotency key named an existing job).
        """
        if not JOB_ID.match(spec.id):
            raise InvalidJob(f"bad job id {spec.id!r}: use 1-128 letters, digits, '.', '_' or '-'")
        t = now()
        fields: dict[str, Any] = {
            "state": "queued",
            "attempt": 0,
            "model": spec.model,
            "language": spec.language,
            "source": spec.source,
            "filename": spec.filename,
            "size": spec.size,
            "sha256": spec.sha256,
            "created_at": repr(t),
            "progress": 0,
        }
        hit = await self.cached_result(spec)
        if hit is not None:
            transcript = await self.redis.hget(self.keys.job(hit.id), "transcript")
            if transcript:
                fields.update(
                    state="completed", cached=1, progress=1, transcript=text(transcript),
                    duration=repr(hit.duration or 0.0), started_at=repr(t), finished_at=repr(t),
                )
        flat = [str(x) for kv in fields.items() for x in kv]
        idem = idempotency_key or ""
        res = await self._create(
            keys=[self.keys.job(spec.id), self.keys.stream, self.keys.index, self.keys.idempotency(idem)],
            args=[spec.id, int(t * 1000), int(self.settings.idempotency_ttl), "1" if idem else "0", *flat],
        )
        outcome, job_id = text(res[0]), text(res[1])
        if outcome == "created":
            self.submitted += 1
            if fields["state"] == "completed":
                self.cache_hits += 1
                await self.redis.expire(self.keys.job(spec.id), int(self.settings.result_ttl))
                log.info("job %s completed from the result cache (same audio as %s)", spec.id, hit.id if hit else "?")
            else:
                log.info("job %s queued (%s, %d bytes, model %s)", spec.id, spec.filename, spec.size, spec.model)
        return await self.get(job_id), outcome == "created"

    async def list(self, state: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs first, optionally only those in ``state``."""
        out: list[Job] = []
        start, page = 0, max(limit, 100)
        while len(out) < limit:
            ids: list[bytes] = await self.redis.zrevrange(self.keys.index, start, start + page - 1)  # type: ignore[assignment]
            if not ids:
                break
            start += page
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self.keys.job(text(job_id)))
                hashes = await pipe.execute()
            expired = []
            for job_id, h in zip(ids, hashes, strict=True):
                if not h:
                    expired.append(job_id)
                    continue
                job = from_hash(text(job_id), h)
                if state is None or job.state == state:
                    out.append(job)
                    if len(out) == limit:
                        break
            if expired:  # records expire on their own; the index is pruned lazily here
                await self.redis.zrem(self.keys.index, *expired)
                start -= len(expired)
        return out

    async def cancel(self, job_id: str) -> Job:
        """Cancels a queued job at once; asks the owner of a running job to stop it."""
        res = (await self._cancel(
            keys=[self.keys.job(job_id), self.keys.retry],
            args=[job_id, repr(now()), int(self.settings.result_ttl)],
        ))
        res = text(res)
        if res == "missing":
            raise JobNotFound(f"no job {job_id!r}")
        if res.startswith("terminal:"):
            state = res.split(":", 1)[1]
            raise JobConflict(f"job {job_id!r} is already {state}; only queued or running jobs can be cancelled")
        log.info("job %s %s", job_id, "cancelled" if res == "cancelled" else "cancel requested (running)")
        return await self.get(job_id)

    async def transcript_key(self, job_id: str) -> str:
        """The object-store key of the job's transcript; the job must be completed."""
        state, key = await self.redis.hmget(self.keys.job(job_id), ["state", "transcript"])
        if state is None:
            raise JobNotFound(f"no job {job_id!r}")
        if state != b"completed" or not key:
            raise TranscriptNotReady(f"job {job_id!r} is {text(state)}; the transcript exists once it is completed")
        return text(key)

    async def stats(self) -> dict[str, int]:
        """Queue depth figures for health and metrics."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.stream)
            pipe.xpending(self.keys.stream, GROUP)
            pipe.zcard(self.keys.retry)
            stream_len, pending, delayed = await pipe.execute(raise_on_error=False)
        if isinstance(stream_len, Exception) or isinstance(delayed, Exception):
            raise stream_len if isinstance(stream_len, Exception) else delayed
        # No group (yet, or lost with the server's data): nothing is running; the worker recreates it.
        running = pending["pending"] if isinstance(pending, dict) else 0
        return {"queued": max(0, stream_len - running) + delayed, "running": running, "delayed": delayed}

    def __repr__(self) -> str:
        return f"JobQueue(submitted={self.submitted}, cache_hits={self.cache_hits})"

