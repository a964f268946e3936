"""The consuming side of the work stream: read, heartbeat, reclaim, retry, and fenced completion.

A node reads at most as many entries as it has free pool slots. While an attempt runs, its owner refreshes the
entry's idle time (``XCLAIM ... JUSTID``) and its progress every ``heartbeat_interval``; every node periodically
takes over entries idle longer than ``heartbeat_timeout`` (``XAUTOCLAIM``), whose owner is presumed dead. Each
state change goes through one Lua script that checks the attempt's fencing token, so a worker that lost its entry
can neither overwrite nor acknowledge the new owner's work.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from . import scripts
from .job import options_key, text
from .keys import GROUP, Keys
from .queue import ensure_group
from .settings import JobSettings

log = logging.getLogger(__name__)

#: How long one XREADGROUP blocks; bounds how quickly the read loop notices shutdown.
READ_BLOCK_S = 1.0


class Attempt:
    """One attempt at a job on this node, as the executor sees it."""

    def __init__(self, job_id: str, number: int, entry: str, token: str, fields: dict[str, str]) -> None:
        self.job_id = job_id
        self.number = number
        self.entry = entry
        self.token = token
        self.fields = fields
        self.progress = 0.0
        #: Set when the attempt must stop; ``abort_reason`` says why (cancel, timeout, stale, shutdown).
        self.aborted = asyncio.Event()
        self.abort_reason: str | None = None
        self.started = time.monotonic()
        #: The fields stored on completion (transcript key, duration), once completed.
        self.result: dict[str, str] | None = None

    def report(self, fraction: float) -> None:
        """Records progress in [0, 1]; the heartbeat writes it."""
        self.progress = min(1.0, max(self.progress, fraction))

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        self.aborted.set()

    def __repr__(self) -> str:
        return f"Attempt({self.job_id!r}, number={self.number}, progress={self.progress:.2f})"


#: Runs an attempt and returns the job-record fields to store on completion (at least ``transcript``).
Execute = Callable[[Attempt], Awaitable[dict[str, str]]]

#: Told of every finished attempt: (outcome, attempt, error code or None).
Observer = Callable[[str, Attempt, str | None], None]


class Worker:
    """Takes entries from the work stream and runs them through ``execute``, up to ``slots`` at a time."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        settings: JobSettings,
        node_id: str,
        slots: int,
        execute: Execute,
        observer: Observer | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.node_id = node_id
        self.slots = slots
        self.execute = execute
        self.observer = observer
        self._start_script = redis.register_script(scripts.START)
        self._heartbeat_script = redis.register_script(scripts.HEARTBEAT)
        self._finish_script = redis.register_script(scripts.FINISH)
        self._promote_script = redis.register_script(scripts.PROMOTE)
        self._running: dict[str, tuple[asyncio.Task[None], Attempt | None]] = {}
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._redis_down_since: float | None = None
        self.counts = {"started": 0, "completed": 0, "failed": 0, "retried": 0, "cancelled": 0,
                       "reclaimed": 0, "released": 0, "lost": 0}

    @property
    def busy(self) -> int:
        return len(self._running)

    @property
    def free(self) -> int:
        return max(0, self.slots - len(self._running))

    def attempts(self) -> list[Attempt]:
        return [a for _, a in self._running.values() if a is not None]

    async def start(self) -> None:
        await ensure_group(self.redis, self.keys)
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="worker-read"),
            asyncio.create_task(self._maintenance_loop(), name="worker-maintenance"),
        ]
        log.info("worker %s reading %s with %d slots", self.node_id, self.keys.stream, self.slots)

    # -- reading ---------------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while not self._stopping:
            if self.free == 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                resp: list[Any] = await self.redis.xreadgroup(  # type: ignore[assignment]
                    GROUP, self.node_id, {self.keys.stream: ">"}, count=self.free, block=int(READ_BLOCK_S * 1000)
                )
            except RedisError as e:
                await self._redis_trouble(e)
                continue
            self._redis_ok()
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    self._spawn(text(entry_id), text(fields.get(b"job", b"")), reclaimed=False)

    async def _maintenance_loop(self) -> None:
        """Moves due retries back to the stream and reclaims entries whose owner stopped heartbeating."""
        tick = min(0.5, self.settings.retry_initial / 2, self.settings.reclaim_interval)
        last_reclaim = 0.0
        while not self._stopping:
            try:
                await self._promote_script(
                    keys=[self.keys.retry, self.keys.stream],
                    args=[int(time.time() * 1000), 100, self.keys.job_prefix],
                )
                if time.monotonic() - last_reclaim >= self.settings.reclaim_interval and self.free:
                    last_reclaim = time.monotonic()
                    await self._reclaim()
                self._redis_ok()
            except RedisError as e:
                await self._redis_trouble(e)
            await asyncio.sleep(tick)

    async def _reclaim(self) -> None:
        resp = await self.redis.xautoclaim(
            self.keys.stream, GROUP, self.node_id,
            min_idle_time=int(self.settings.heartbeat_timeout * 1000), start_id="0-0", count=self.free,
        )
        for entry_id, fields in resp[1]:
            entry = text(entry_id)
            if entry in self._running or not fields:
                continue  # ours and alive (a slow heartbeat), or deleted meanwhile
            log.warning("reclaiming entry %s (job %s): its owner stopped heartbeating", entry,
                        text(fields.get(b"job", b"?")))
            self.counts["reclaimed"] += 1
            self._spawn(entry, text(fields.get(b"job", b"")), reclaimed=True)

    def _spawn(self, entry: str, job_id: str, *, reclaimed: bool) -> None:
        task = asyncio.create_task(self._run(entry, job_id), name=f"job-{job_id}")
        self._running[entry] = (task, None)
        task.add_done_callback(functools.partial(self._done, entry))

    def _done(self, entry: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(entry, None)
        self._slot_freed.set()

    # -- one attempt ---------------------------------------------------------------------------------------

    async def _run(self, entry: str, job_id: str) -> None:
        job_key = self.keys.job(job_id)
        s = self.settings
        try:
            res = await self._start_script(
                keys=[job_key, self.keys.stream],
                args=[GROUP, entry, self.node_id, repr(time.time()), s.max_attempts, s.job_timeout, int(s.result_ttl)],
            )
            if res[0] != b"run":
                log.info("job %s not run: %s", job_id, text(res[1]))
                return
            token, number = text(res[1]), int(res[2])
            fields = {text(k): text(v) for k, v in (await self.redis.hgetall(job_key)).items()}
        except RedisError as e:
            # The entry stays pending and is reclaimed once Redis is back.
            log.error("job %s: could not start (%s); it will be reclaimed", job_id, e)
            return
        attempt = Attempt(job_id, number, entry, token, fields)
        self._running[entry] = (self._running[entry][0], attempt)
        self.counts["started"] += 1
        log.info("job %s attempt %d started (entry %s)", job_id, number, entry)
        beat = asyncio.create_task(self._heartbeat(attempt), name=f"heartbeat-{job_id}")
        timer = asyncio.get_running_loop().call_later(s.attempt_timeout, attempt.abort, "timeout")
        try:
            result = await self.execute(attempt)
        except asyncio.CancelledError:
            attempt.abort("shutdown")
            await self._conclude(attempt, "release", None, None)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a job outcome
            await self._failed(attempt, e)
        else:
            if attempt.abort_reason == "stale":
                self._lost(attempt)
            else:
                await self._conclude(attempt, "completed", None, result)
        finally:
            timer.cancel()
            beat.cancel()

    async def _failed(self, attempt: Attempt, e: Exception) -> None:
        reason = attempt.abort_reason
        if reason == "stale":
            self._lost(attempt)
            return
        if reason == "cancel":
            await self._conclude(attempt, "cancelled", None, None)
            return
        if reason == "shutdown":
            await self._conclude(attempt, "release", None, None)
            return
        if reason == "timeout":
            code, message, retryable = "attempt_timeout", f"attempt exceeded {self.settings.attempt_timeout:g} s", True
        else:
            code = getattr(e, "code", "internal_error")
            message = str(e) or type(e).__name__
            retryable = getattr(e, "retryable", True)
            if code == "internal_error":
                log.exception("job %s attempt %d: unexpected error", attempt.job_id, attempt.number)
        if retryable and attempt.number < self.settings.max_attempts:
            await self._conclude(attempt, "retry", (code, message), None)
        else:
            if retryable:
                message = f"gave up after {attempt.number} attempts; last error: {message}"
            await self._conclude(attempt, "failed", (code, message), None)

    def _lost(self, attempt: Attempt) -> None:
        self.counts["lost"] += 1
        log.warning("job %s attempt %d: entry was taken over by another node; result discarded",
                    attempt.job_id, attempt.number)

    async def _conclude(
        self, attempt: Attempt, outcome: str, error: tuple[str, str] | None, result: dict[str, str] | None
    ) -> None:
        s = self.settings
        fields: list[Any] = []
        due = 0
        if outcome == "completed":
            fields += ["progress", "1", "error_code", "", "error", "", "cancel", ""]
            for k, v in (result or {}).items():
                fields += [k, v]
        elif error is not None:
            fields += ["error_code", error[0], "error", error[1]]
        if outcome == "retry":
            delay = s.retry_delay(attempt.number)
            due = int((time.time() + delay) * 1000)
        elif outcome == "release":
            due = int(time.time() * 1000)
        try:
            ok = await self._finish_script(
                keys=[self.keys.job(attempt.job_id), self.keys.stream, self.keys.retry],
                args=[GROUP, attempt.entry, attempt.token, outcome, repr(time.time()), int(s.result_ttl), due,
                      attempt.job_id, *fields],
            )
        except RedisError as e:
            log.error("job %s: could not record %s (%s); the entry will be reclaimed", attempt.job_id, outcome, e)
            return
        if not ok:
            self._lost(attempt)
            return
        elapsed = time.monotonic() - attempt.started
        key = {"completed": "completed", "failed": "failed", "retry": "retried", "cancelled": "cancelled",
               "release": "released"}[outcome]
        self.counts[key] += 1
        if outcome == "retry":
            log.warning("job %s attempt %d failed after %.2fs (%s: %s); retry in %.1fs", attempt.job_id,
                        attempt.number, elapsed, *(error or ("", "")), s.retry_delay(attempt.number))
        elif error is not None:
            log.warning("job %s %s after %.2fs: %s: %s", attempt.job_id, outcome, elapsed, *error)
        else:
            log.info("job %s %s in %.2fs (attempt %d)", attempt.job_id, outcome, elapsed, attempt.number)
        if outcome == "completed":
            attempt.result = result
            await self._remember_result(attempt)
        if self.observer is not None:
            self.observer(outcome, attempt, error[0] if error else None)

    async def _remember_result(self, attempt: Attempt) -> None:
        f = attempt.fields
        if not f.get("sha256"):
            return
        key = self.keys.result(f["sha256"], f.get("model", ""), options_key(f.get("language", "")))
        try:
            await self.redis.set(key, attempt.job_id, ex=int(self.settings.result_ttl))
        except RedisError as e:  # only a cache: the job itself is recorded
            log.warning("job %s: result cache not updated (%s)", attempt.job_id, e)

    async def _heartbeat(self, attempt: Attempt) -> None:
        """Keeps the entry ours, writes progress, and notices cancellation and lost ownership."""
        job_key = self.keys.job(attempt.job_id)
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                r = await self._heartbeat_script(
                    keys=[job_key, self.keys.stream],
                    args=[GROUP, attempt.entry, self.node_id, attempt.token, f"{attempt.progress:.4f}"],
                )
            except RedisError as e:
                log.warning("job %s: heartbeat failed (%s)", attempt.job_id, e)
                continue
            if r == b"stale":
                attempt.abort("stale")
                return
            if r == b"cancel":
                log.info("job %s: cancel requested, stopping attempt %d", attempt.job_id, attempt.number)
                attempt.abort("cancel")
                return

    # -- health ----------------------------------------------------------------------------------------------

    async def _redis_trouble(self, e: Exception) -> None:
        if isinstance(e, ResponseError) and "NOGROUP" in str(e):
            # The server lost the stream (restarted without persistence, flushed): every job record it held is
            # gone too. Recreate the group so new work flows again, and say so loudly.
            log.error("work stream %s or its group is missing (did Redis lose its data?); recreating it",
                      self.keys.stream)
            try:
                await ensure_group(self.redis, self.keys)
                return
            except RedisError as again:
                e = again
        # Loud once, then quiet until it recovers.
        if self._redis_down_since is None:
            self._redis_down_since = time.monotonic()
            log.error("redis unreachable: %s; retrying", e)
        else:
            log.debug("redis still unreachable: %s", e)
        await asyncio.sleep(0.5)

    def _redis_ok(self) -> None:
        if self._redis_down_since is not None:
            log.warning("redis reachable again after %.1fs", time.monotonic() - self._redis_down_since)
            self._redis_down_since = None

    # -- shutdown --------------------------------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Stops taking work, lets running attempts finish for ``grace`` seconds, then hands the rest back."""
        if self._stopping and not self._tasks and not self._running:
            return
        self._stopping = True
        self._slot_freed.set()
        # 1. Stop reading: the read loop notices within one block period.
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=READ_BLOCK_S + 1)
            for t in pending:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        # 2. Let running attempts finish within the grace period.
        grace = self.settings.shutdown_grace if grace is None else grace
        tasks = [t for t, _ in self._running.values()]
        if tasks:
            log.info("waiting up to %.0fs for %d running job(s)", grace, len(tasks))
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            # 3. Hand back what is left: the attempt is aborted and its job queued again, not counted.
            for a in self.attempts():
                a.abort("shutdown")
            if pending:
                await asyncio.wait(pending, timeout=10)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        c = self.counts
        return (f"Worker({self.node_id!r}, busy={self.busy}/{self.slots}, completed={c['completed']}, "
                f"failed={c['failed']}, retried={c['retried']}, reclaimed={c['reclaimed']})")
