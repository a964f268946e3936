"""The work stream's semantics against a real valkey server: delivery, heartbeat, reclaim, fencing, retries,
timeouts, cancellation, idempotency and shutdown. The executor is a plain coroutine so each test controls exactly
what an attempt does; the transcription path itself is covered by test_node.py."""

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from scheduler import scripts
from scheduler.errors import JobConflict, JobNotFound
from scheduler.job import JobSpec
from scheduler.keys import GROUP, Keys
from scheduler.queue import JobQueue
from scheduler.settings import JobSettings
from scheduler.worker import Attempt, Worker
from transcoder.errors import Aborted, DecodeError, WorkerCrashed

from .server_fixtures import FAST_JOBS, wait_for

KEYS = Keys("t:")
SETTINGS = JobSettings(**FAST_JOBS)


def spec(job_id: str, sha: str = "0" * 64) -> JobSpec:
    return JobSpec(id=job_id, source=f"audio/{job_id}", model="tiny.en", language="en", filename=f"{job_id}.wav",
                   size=1, sha256=sha)


class Harness:
    """Workers over one valkey, closed at the end of the test."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.queue = JobQueue(redis, KEYS, SETTINGS)
        self.workers: list[Worker] = []

    async def worker(self, execute: Callable[[Attempt], Awaitable[dict[str, str]]], name: str = "a",
                     slots: int = 1, **settings: float) -> Worker:
        w = Worker(self.redis, KEYS, JobSettings(**{**FAST_JOBS, **settings}), name, slots, execute)
        await w.start()
        self.workers.append(w)
        return w

    async def state(self, job_id: str) -> str:
        return (await self.queue.get(job_id)).state

    async def done(self, job_id: str, timeout: float = 30) -> None:
        await wait_for(lambda: self._terminal(job_id), timeout)

    async def _terminal(self, job_id: str) -> bool:
        return (await self.queue.get(job_id)).terminal

    async def pending(self) -> int:
        return (await self.redis.xpending(KEYS.stream, GROUP))["pending"]

    async def close(self) -> None:
        for w in self.workers:
            await w.close(grace=0)


@pytest.fixture
async def h(redis_client: aioredis.Redis):
    harness = Harness(redis_client)
    await harness.queue.start()
    yield harness
    await harness.close()


async def complete(attempt: Attempt) -> dict[str, str]:
    attempt.report(0.5)
    return {"transcript": f"transcripts/{attempt.job_id}.json", "duration": "1.0"}


async def test_job_completes_once(h: Harness) -> None:
    job, created = await h.queue.submit(spec("j1"))
    assert created and job.state == "queued"
    await h.worker(complete)
    await h.done("j1")
    job = await h.queue.get("j1")
    assert (job.state, job.attempts, job.progress, job.node, job.error) == ("completed", 1, 1.0, "a", None)
    assert job.started_at and job.finished_at and job.finished_at >= job.started_at >= job.created_at
    assert await h.queue.transcript_key("j1") == "transcripts/j1.json"
    assert await h.pending() == 0
    assert await h.redis.xlen(KEYS.stream) == 0  # acknowledged entries are deleted with the ack


async def test_retry_with_backoff_then_failed(h: Harness) -> None:
    """1. every attempt raises a retryable error; 2. the job is retried with growing delays; 3. after
    max_attempts it is failed with the last error kept."""
    starts: list[float] = []

    async def crash(attempt: Attempt) -> dict[str, str]:
        starts.append(time.monotonic())
        raise WorkerCrashed(f"boom {attempt.number}")

    await h.queue.submit(spec("j2"))
    w = await h.worker(crash)
    await h.done("j2")
    job = await h.queue.get("j2")
    assert (job.state, job.attempts) == ("failed", 3)
    assert job.error is not None and job.error.code == "worker_crashed"
    assert "gave up after 3 attempts" in job.error.message and "boom 3" in job.error.message
    assert len(starts) == 3
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # retry_initial 0.2, x2
    assert w.counts["retried"] == 2 and w.counts["failed"] == 1
    assert await h.pending() == 0 and await h.redis.zcard(KEYS.retry) == 0


async def test_permanent_error_fails_without_retry(h: Harness) -> None:
    async def bad_audio(attempt: Attempt) -> dict[str, str]:
        raise DecodeError("not audio")

    await h.queue.submit(spec("j3"))
    await h.worker(bad_audio)
    await h.done("j3")
    job = await h.queue.get("j3")
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.error is not None and (job.error.code, job.error.message) == ("undecodable_audio", "not audio")


async def test_reclaim_after_owner_died(h: Harness) -> None:
    """1. a worker "dead" reads the entry and starts the attempt, then stops heartbeating (it died);
    2. worker b reclaims the entry once it has been idle for heartbeat_timeout;
    3. the job completes once, with attempts = 2, and nothing is left pending."""
    await h.queue.submit(spec("j4"))
    start = h.redis.register_script(scripts.START)
    entries = await h.redis.xreadgroup(GROUP, "dead", {KEYS.stream: ">"}, count=1)
    entry = entries[0][1][0][0].decode()
    res = await start(keys=[KEYS.job("j4"), KEYS.stream],
                      args=[GROUP, entry, "dead", time.time(), 3, 7200, 3600])
    assert res[0] == b"run"
    assert (await h.queue.get("j4")).state == "running"
    w = await h.worker(complete, name="b")
    await h.done("j4", timeout=20)
    job = await h.queue.get("j4")
    assert (job.state, job.attempts, job.node) == ("completed", 2, "b")
    assert w.counts["reclaimed"] == 1
    assert await h.pending() == 0


async def test_heartbeat_keeps_a_long_job(h: Harness) -> None:
    """A job running for twice the heartbeat timeout is not reclaimed by an idle peer."""
    async def slow(attempt: Attempt) -> dict[str, str]:
        await asyncio.sleep(SETTINGS.heartbeat_timeout * 2)
        return await complete(attempt)

    await h.queue.submit(spec("j5"))
    a = await h.worker(slow, name="a")
    await wait_for(lambda: h.state("j5"), timeout=10)
    await wait_for(lambda: a.busy == 1, timeout=10)
    b = await h.worker(complete, name="b")
    await h.done("j5", timeout=20)
    job = await h.queue.get("j5")
    assert (job.state, job.attempts, job.node) == ("completed", 1, "a")
    assert b.counts["reclaimed"] == 0 and b.counts["started"] == 0


async def test_stale_owner_cannot_complete(h: Harness) -> None:
    """1. a starts attempt 1; 2. b takes the entry over (attempt 2); 3. a's completion, progress and ack are
    refused; 4. b's completion is accepted."""
    await h.queue.submit(spec("j6"))
    start = h.redis.register_script(scripts.START)
    finish = h.redis.register_script(scripts.FINISH)
    beat = h.redis.register_script(scripts.HEARTBEAT)
    entry = (await h.redis.xreadgroup(GROUP, "a", {KEYS.stream: ">"}, count=1))[0][1][0][0].decode()
    job_keys = [KEYS.job("j6"), KEYS.stream]
    _, token_a, _ = await start(keys=job_keys, args=[GROUP, entry, "a", time.time(), 3, 7200, 3600])
    await h.redis.xclaim(KEYS.stream, GROUP, "b", 0, [entry], justid=True)
    _, token_b, attempt_b = await start(keys=job_keys, args=[GROUP, entry, "b", time.time(), 3, 7200, 3600])
    assert attempt_b == b"2" and token_a != token_b
    finish_keys = [*job_keys, KEYS.retry]
    assert await beat(keys=job_keys, args=[GROUP, entry, "a", token_a, "0.9"]) == b"stale"
    stale = await finish(keys=finish_keys, args=[GROUP, entry, token_a, "completed", time.time(), 3600, 0, "j6",
                                                 "transcript", "from-a"])
    assert stale == 0
    assert await h.pending() == 1  # a's refused completion did not acknowledge b's entry
    job = await h.queue.get("j6")
    assert (job.state, job.node, job.progress) == ("running", "b", 0.0)
    ok = await finish(keys=finish_keys, args=[GROUP, entry, token_b, "completed", time.time(), 3600, 0, "j6",
                                              "transcript", "from-b"])
    assert ok == 1
    assert await h.queue.transcript_key("j6") == "from-b"
    assert await h.pending() == 0
    # A second completion with the same token is refused too: the token is spent.
    assert await finish(keys=finish_keys, args=[GROUP, entry, token_b, "failed", time.time(), 3600, 0, "j6"]) == 0


async def test_lost_entry_aborts_the_old_owner(h: Harness) -> None:
    """A worker whose heartbeat finds its token stale aborts the attempt and writes nothing."""
    seen: list[str | None] = []

    async def wait_abort(attempt: Attempt) -> dict[str, str]:
        await attempt.aborted.wait()
        seen.append(attempt.abort_reason)
        raise Aborted("stopped")

    await h.queue.submit(spec("j7"))
    a = await h.worker(wait_abort, name="a")
    await wait_for(lambda: a.busy == 1)
    await wait_for(lambda: h.state("j7"))
    await h.redis.hset(KEYS.job("j7"), "token", "someone-else")  # as if another node had taken over
    await wait_for(lambda: seen, timeout=5)
    assert seen == ["stale"] and a.counts["lost"] == 1
    assert (await h.queue.get("j7")).state == "running"  # untouched by the stale owner


async def test_cancel_running_job(h: Harness) -> None:
    async def wait_abort(attempt: Attempt) -> dict[str, str]:
        await asyncio.wait_for(attempt.aborted.wait(), 20)
        raise Aborted("stopped")

    await h.queue.submit(spec("j8"))
    await h.worker(wait_abort)
    await wait_for(lambda: _is(h, "j8", "running"))
    job = await h.queue.cancel("j8")
    assert job.state == "running"  # cancellation requested; the owner stops it
    await h.done("j8")
    job = await h.queue.get("j8")
    assert (job.state, job.attempts) == ("cancelled", 1)
    assert await h.pending() == 0
    with pytest.raises(JobConflict):
        await h.queue.cancel("j8")


async def test_cancel_queued_job_is_never_run(h: Harness) -> None:
    ran: list[str] = []

    async def record(attempt: Attempt) -> dict[str, str]:
        ran.append(attempt.job_id)
        return await complete(attempt)

    await h.queue.submit(spec("j9"))
    assert (await h.queue.cancel("j9")).state == "cancelled"
    await h.queue.submit(spec("j10"))
    await h.worker(record)
    await h.done("j10")
    assert ran == ["j10"]
    assert await h.state("j9") == "cancelled" and await h.pending() == 0
    with pytest.raises(JobNotFound):
        await h.queue.cancel("nope")


async def test_idempotent_submit(h: Harness) -> None:
    first, created = await h.queue.submit(spec("same"))
    again, created_again = await h.queue.submit(spec("same"))
    assert created and not created_again and again.id == first.id == "same"
    assert await h.redis.xlen(KEYS.stream) == 1  # queued once
    by_key, c1 = await h.queue.submit(spec("k1"), idempotency_key="client-key-1")
    repeat, c2 = await h.queue.submit(spec("k2"), idempotency_key="client-key-1")
    assert c1 and not c2 and repeat.id == by_key.id == "k1"
    assert await h.queue.find("k2") is None


async def test_reads_no_more_than_free_slots(h: Harness) -> None:
    release = asyncio.Event()

    async def block(attempt: Attempt) -> dict[str, str]:
        await release.wait()
        return await complete(attempt)

    for i in range(4):
        await h.queue.submit(spec(f"s{i}"))
    w = await h.worker(block, slots=2)
    await wait_for(lambda: w.busy == 2)
    await asyncio.sleep(0.5)
    assert await h.pending() == 2  # two delivered; two still in the stream for other nodes
    release.set()
    for i in range(4):
        await h.done(f"s{i}")
    assert w.counts["completed"] == 4


async def test_attempt_timeout_retries(h: Harness) -> None:
    async def hang(attempt: Attempt) -> dict[str, str]:
        if attempt.number == 1:
            await attempt.aborted.wait()
            raise Aborted("stopped")
        return await complete(attempt)

    await h.queue.submit(spec("t1"))
    await h.worker(hang, attempt_timeout=0.5)
    await h.done("t1")
    job = await h.queue.get("t1")
    assert (job.state, job.attempts) == ("completed", 2)


async def test_job_timeout_fails(h: Harness) -> None:
    await h.queue.submit(spec("old"))
    await h.redis.hset(KEYS.job("old"), "created_at", repr(time.time() - 10))
    await h.worker(complete, job_timeout=5)
    await h.done("old")
    job = await h.queue.get("old")
    assert job.state == "failed" and job.error is not None and job.error.code == "job_timeout"


async def test_shutdown_hands_running_jobs_back(h: Harness) -> None:
    """1. a runs a job; 2. a shuts down with no grace: the attempt is aborted and the job queued again, the
    attempt not counted; 3. b completes it with attempts = 1."""
    async def wait_abort(attempt: Attempt) -> dict[str, str]:
        await attempt.aborted.wait()
        raise Aborted("stopped")

    await h.queue.submit(spec("h1"))
    a = await h.worker(wait_abort, name="a")
    await wait_for(lambda: _is(h, "h1", "running"))
    await a.close(grace=0)
    assert a.counts["released"] == 1
    assert await h.state("h1") == "queued"
    await h.worker(complete, name="b")
    await h.done("h1")
    job = await h.queue.get("h1")
    assert (job.state, job.attempts, job.node) == ("completed", 1, "b")


async def test_list_filters_and_orders(h: Harness) -> None:
    for i in range(5):
        await h.queue.submit(spec(f"l{i}"))
    await h.queue.cancel("l1")
    newest_first = [j.id for j in await h.queue.list(limit=3)]
    assert newest_first == ["l4", "l3", "l2"]
    assert [j.id for j in await h.queue.list(state="cancelled")] == ["l1"]
    await h.redis.delete(KEYS.job("l0"))  # an expired record is skipped and pruned from the index
    assert "l0" not in [j.id for j in await h.queue.list(limit=10)]
    assert await h.redis.zscore(KEYS.index, "l0") is None


async def _is(h: Harness, job_id: str, state: str) -> bool:
    return await h.state(job_id) == state


async def test_lost_stream_is_recreated(h: Harness) -> None:
    """Redis lost its data (restart without persistence, FLUSHALL): the worker recreates the stream's group and
    new jobs run again."""
    await h.worker(complete)
    await h.queue.submit(spec("before"))
    await h.done("before")
    await h.redis.flushall()
    await asyncio.sleep(0.3)
    await h.queue.submit(spec("after"))
    await h.done("after", timeout=20)
    assert await h.state("after") == "completed"
