"""Prometheus metrics of one node, in a registry of its own (several nodes can share a test process)."""

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, openmetrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from scheduler.worker import Attempt

if TYPE_CHECKING:
    from .app import Node


class Metrics:
    """The node's counters, histograms and gauges."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.submitted = Counter("v2t_jobs_submitted", "Jobs accepted by this node's API", ["cached"], registry=r)
        self.submit_seconds = Histogram(
            "v2t_submit_seconds", "Time to accept a submission (upload included)", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.attempts = Counter("v2t_attempts", "Attempts finished on this node, by outcome", ["outcome"], registry=r)
        self.attempt_seconds = Histogram(
            "v2t_attempt_seconds", "Wall time of completed attempts", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
        )
        self.audio_seconds = Counter("v2t_audio_seconds", "Seconds of audio transcribed on this node", registry=r)
        self.errors = Counter("v2t_job_errors", "Failed attempts by error code", ["code"], registry=r)
        self.queue = Gauge("v2t_queue_jobs", "Jobs in the cluster's queue by state", ["state"], registry=r)
        self.pool_processes = Gauge("v2t_pool_processes", "Live whisper.cpp pool processes", registry=r)
        self.pool_busy = Gauge("v2t_pool_busy", "Pool processes running a job", registry=r)
        self.pool_crashes = Counter("v2t_pool_crashes", "Pool processes that died and were replaced", registry=r)
        self.cache_hits = Counter("v2t_file_cache_hits", "Audio served from the local file cache", registry=r)
        self.cache_misses = Counter("v2t_file_cache_misses", "Audio fetched from the object store", registry=r)
        self.cache_evictions = Counter("v2t_file_cache_evictions", "Files evicted from the file cache", registry=r)
        self.cache_bytes = Gauge("v2t_file_cache_bytes", "Bytes held by the local file cache", registry=r)
        self.started = time.time()

    def observe(self, outcome: str, attempt: Attempt, code: str | None) -> None:
        """The worker's observer: one call per finished attempt."""
        self.attempts.labels(outcome).inc()
        if code:
            self.errors.labels(code).inc()
        if outcome == "completed":
            self.attempt_seconds.observe(time.monotonic() - attempt.started)
            if attempt.result and attempt.result.get("duration"):
                self.audio_seconds.inc(float(attempt.result["duration"]))

    def handler(self, node: "Node") -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def metrics(request: web.Request) -> web.Response:
            await self.refresh(node)
            if "application/openmetrics-text" in request.headers.get("Accept", ""):
                exposition = openmetrics.exposition
                body, ctype = exposition.generate_latest(self.registry), exposition.CONTENT_TYPE_LATEST
            else:
                body, ctype = generate_latest(self.registry), CONTENT_TYPE_LATEST
            resp = web.Response(body=body)
            resp.content_type = ctype.split(";")[0]
            return resp

        return metrics

    async def refresh(self, node: "Node") -> None:
        """Gauges that are read on demand rather than updated on events."""
        if node.pool is not None:
            self.pool_processes.set(len(node.pool.pids))
            self.pool_busy.set(node.pool.busy)
            _catch_up(self.pool_crashes, node.pool.crashes)
        if (cache := node.file_cache) is not None:
            _catch_up(self.cache_hits, cache.hits)
            _catch_up(self.cache_misses, cache.misses)
            _catch_up(self.cache_evictions, cache.evictions)
            self.cache_bytes.set(cache.bytes)
        if node.worker is not None:  # started
            try:
                for state, n in (await node.queue.stats()).items():
                    self.queue.labels(state).set(n)
            except Exception:  # noqa: BLE001 - metrics must render while Redis is down
                pass


def _catch_up(counter: Counter, total: int) -> None:
    """Advances a Prometheus counter to a component's own running total (components keep plain ints)."""
    behind = total - counter._value.get()
    if behind > 0:
        counter.inc(behind)
