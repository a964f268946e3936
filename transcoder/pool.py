"""The whisper.cpp process pool.

``processes`` worker processes (default ``max(1, cores - 2)``), each with its own Engine and ``threads``
inference threads. Each process decodes its job's audio itself (PyAV), so decoding runs beside inference in other
processes instead of on the event loop. A process talks to the pool over a pipe: ``progress`` messages while it
works, then ``result`` or ``error``. Aborting is a byte of shared memory the process's abort callback reads.
A process that dies (segfault, OOM kill) ends its job with :class:`WorkerCrashed` and is replaced.
"""

import asyncio
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from .errors import DecodeError, TranscoderError, WorkerCrashed
from .transcript import Transcript

log = logging.getLogger(__name__)

#: How long a new process may take to start and load its first model.
START_TIMEOUT_S = 120.0
#: Pause before replacing a process that died, growing while replacements keep dying (a crash loop).
RESPAWN_DELAY_S = 0.5
RESPAWN_DELAY_MAX_S = 30.0

_EOF = object()


class PoolSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``[pool]`` section."""

    #: Worker processes; 0 means ``max(1, cores - 2)``.
    processes: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Inference threads per process; 0 means the cores divided evenly among the processes.
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Models each process keeps loaded at once.
    max_models: Annotated[int, msgspec.Meta(ge=1)] = 2
    #: A model unused this long is unloaded (seconds).
    idle_unload: Annotated[float, msgspec.Meta(gt=0)] = 600.0

    def sizes(self, cores: int | None = None) -> tuple[int, int]:
        """(processes, threads per process) after applying the automatic defaults."""
        cores = cores or os.cpu_count() or 1
        processes = self.processes or max(1, cores - 2)
        threads = self.threads or max(1, cores // processes)
        return processes, threads


class Job(msgspec.Struct, frozen=True):
    """What the pool sends a process."""

    audio: str
    model_path: str
    model_name: str
    language: str


def _child_main(
    conn: multiprocessing.connection.Connection,
    abort_flag: Any,
    threads: int,
    max_models: int,
    idle_unload: float,
    preload: str | None,
) -> None:
    """A pool process: load the default model, then run jobs until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node handles Ctrl-C and tells us to stop
    _die_with_parent()
    from .decode import decode
    from .engine import Engine

    engine = Engine(threads, max_models)
    if preload:
        try:
            engine.model(Path(preload))
        except TranscoderError as e:
            conn.send(("error", e.code, str(e), e.retryable))
            return
    conn.send(("ready", os.getpid()))
    while True:
        if not conn.poll(idle_unload):
            engine.unload_idle(idle_unload)
            continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job: Job = msg
        try:
            samples = decode(job.audio)
            duration = len(samples) / 16000
            conn.send(("decoded", duration))
            transcript = engine.transcribe(
                samples,
                Path(job.model_path),
                model_name=job.model_name,
                language=job.language,
                on_segment=lambda done: conn.send(("progress", done)),
                should_abort=lambda: abort_flag.value != 0,
            )
            conn.send(("result", msgspec.msgpack.encode(transcript)))
        except TranscoderError as e:
            conn.send(("error", e.code, str(e), e.retryable))
        except Exception as e:  # noqa: BLE001 - reported to the parent as a retryable failure
            conn.send(("error", "transcription_failed", f"{type(e).__name__}: {e}", True))


def _die_with_parent() -> None:
    """SIGKILL this process when the node dies, even by SIGKILL: an orphan would go on burning CPU on a job that
    another node is about to run again. (The node starts pool processes from its event loop's thread, which lives
    as long as it does; PDEATHSIG follows the creating thread.)"""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the closed pipe still stops us at the next message
        return
    if os.getppid() != parent:  # the node died before the prctl took effect
        os._exit(1)


class _Process:
    """The parent's handle on one pool process."""

    def __init__(self, process: Any, conn: multiprocessing.connection.Connection, abort_flag: Any) -> None:
        self.process = process
        self.conn = conn
        self.abort_flag = abort_flag
        self.pid: int = process.pid
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.dead = False
        self.jobs = 0

    def on_readable(self) -> None:
        try:
            while self.conn.poll():
                self.inbox.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self.dead = True
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self.inbox.put_nowait(_EOF)


ProgressFn = Callable[[float, float], None]  # (seconds done, duration)
ModelResolver = Callable[[str], Path]


class TranscriberPool:
    """Runs transcriptions in worker processes; ``await transcribe(...)`` waits for a free one."""

    def __init__(self, settings: PoolSettings, resolve_model: ModelResolver, preload: str | None = None) -> None:
        self.settings = settings
        self.resolve_model = resolve_model
        self.preload = preload
        self.size, self.threads = settings.sizes()
        self._ctx = multiprocessing.get_context("spawn")  # never fork an event loop with threads
        self._procs: list[_Process] = []
        self._idle: asyncio.Queue[_Process] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._respawn_delay = RESPAWN_DELAY_S
        self.crashes = 0
        self.completed = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if not p.dead]

    @property
    def busy(self) -> int:
        return len(self._procs) - self._idle.qsize()

    async def start(self) -> None:
        preload = str(await asyncio.to_thread(self.resolve_model, self.preload)) if self.preload else None
        self._preload_path = preload
        procs = await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        for p in procs:
            self._idle.put_nowait(p)
        log.info("pool started: %d process(es) x %d thread(s), pids %s", self.size, self.threads, self.pids)

    async def _spawn(self) -> _Process:
        parent, child = self._ctx.Pipe()
        flag = self._ctx.Value("b", 0, lock=False)
        s = self.settings
        process = self._ctx.Process(
            target=_child_main,
            args=(child, flag, self.threads, s.max_models, s.idle_unload, self._preload_path),
            name="v2t-whisper",
            daemon=True,
        )
        process.start()
        child.close()  # so the child's death shows as EOF on our end
        proc = _Process(process, parent, flag)
        asyncio.get_running_loop().add_reader(parent.fileno(), proc.on_readable)
        self._procs.append(proc)
        try:
            msg = await asyncio.wait_for(proc.inbox.get(), START_TIMEOUT_S)
        except TimeoutError:
            msg = ("error", "start_timeout", f"pool process did not start within {START_TIMEOUT_S:g} s", True)
        if msg is _EOF or msg[0] != "ready":
            self._forget(proc)
            detail = msg[2] if msg is not _EOF else f"exit code {process.exitcode}"
            raise WorkerCrashed(f"pool process failed to start: {detail}")
        return proc

    def _forget(self, proc: _Process) -> None:
        if proc in self._procs:
            self._procs.remove(proc)
        if not proc.dead:
            proc.dead = True
            try:
                asyncio.get_running_loop().remove_reader(proc.conn.fileno())
            except (ValueError, OSError):
                pass
        if proc.process.is_alive():
            proc.process.kill()
        proc.process.join(timeout=0)
        proc.conn.close()

    async def transcribe(
        self,
        audio: Path | str,
        model: str,
        language: str = "en",
        on_progress: ProgressFn | None = None,
        abort: asyncio.Event | None = None,
    ) -> Transcript:
        """Decodes and transcribes ``audio`` with ``model`` in a pool process.

        Raises DecodeError (and subclasses) for bad audio, Aborted when ``abort`` is set, WorkerCrashed when the
        process died, and ModelError when the model is missing.
        """
        if self._closed:
            raise WorkerCrashed("the pool is closed")
        model_path = await asyncio.to_thread(self.resolve_model, model)
        proc = await self._idle.get()
        watcher: asyncio.Task[None] | None = None
        handed_back = False
        try:
            if proc.dead:  # died while idle
                raise WorkerCrashed(f"pool process {proc.pid} died (exit code {proc.process.exitcode})")
            proc.abort_flag.value = 0
            proc.jobs += 1
            proc.conn.send(Job(str(audio), str(model_path), model, language))
            if abort is not None:
                watcher = asyncio.create_task(self._watch_abort(abort, proc))
            duration = 0.0
            while True:
                msg = await proc.inbox.get()
                if msg is _EOF:
                    await asyncio.to_thread(proc.process.join, 1)  # so the exit code is known
                    raise WorkerCrashed(
                        f"pool process {proc.pid} died while transcribing (exit code {proc.process.exitcode})"
                    )
                kind = msg[0]
                if kind == "decoded":
                    duration = msg[1]
                elif kind == "progress":
                    if on_progress is not None and duration:
                        on_progress(min(msg[1], duration), duration)
                elif kind == "result":
                    self.completed += 1
                    self._respawn_delay = RESPAWN_DELAY_S
                    return msgspec.msgpack.decode(msg[1], type=Transcript)
                elif kind == "error":
                    raise _error(msg[1], msg[2], msg[3])
        except asyncio.CancelledError:
            # The caller went away; stop the work and take the process back once it has answered.
            proc.abort_flag.value = 1
            handed_back = True
            self._own(self._drain(proc))
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if not handed_back:
                self._release(proc)

    async def _watch_abort(self, abort: asyncio.Event, proc: _Process) -> None:
        await abort.wait()
        proc.abort_flag.value = 1

    async def _drain(self, proc: _Process) -> None:
        while not proc.dead:
            msg = await proc.inbox.get()
            if msg is _EOF or msg[0] in ("result", "error"):
                break
        self._release(proc)

    def _release(self, proc: _Process) -> None:
        if not proc.dead:
            self._idle.put_nowait(proc)
            return
        self.crashes += 1
        self._forget(proc)
        if not self._closed:
            log.error("pool process %d died (exit code %s); replacing it", proc.pid, proc.process.exitcode)
            self._own(self._replace())

    async def _replace(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._respawn_delay)
            self._respawn_delay = min(RESPAWN_DELAY_MAX_S, self._respawn_delay * 2)
            try:
                proc = await self._spawn()
            except WorkerCrashed as e:
                log.error("%s; trying again", e)
                continue
            if self._closed:
                self._forget(proc)
                return
            self._idle.put_nowait(proc)
            log.info("pool process %d replaced the dead one", proc.pid)
            return

    def _own(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stops every process: asks politely, then kills those that do not exit within a few seconds."""
        if self._closed:
            return
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self._procs:
            p.abort_flag.value = 1
            try:
                p.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p in list(self._procs):
            await asyncio.to_thread(p.process.join, max(0.0, deadline - time.monotonic()))
            self._forget(p)
        self._procs.clear()

    def __repr__(self) -> str:
        return (f"TranscriberPool(processes={self.size}, threads={self.threads}, busy={self.busy}, "
                f"completed={self.completed}, crashes={self.crashes})")


def _error(code: str, message: str, retryable: bool) -> TranscoderError:
    """Rebuilds a pool process's error in the parent, keeping its code and retryability."""
    from . import decode, errors

    for cls in [*vars(errors).values(), *vars(decode).values()]:
        if isinstance(cls, type) and issubclass(cls, TranscoderError) and cls.code == code:
            return cls(message)
    err = DecodeError(message) if not retryable else TranscoderError(message)
    err.code = code
    return err

