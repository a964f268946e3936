"""What one attempt does: fetch the audio, transcribe it in the pool, store the transcript."""

import logging
from pathlib import Path

import msgspec

from cache.lru import FileCache
from cache.store import ObjectStore
from transcoder.pool import TranscriberPool
from transcoder.transcript import Transcript

from .worker import Attempt

log = logging.getLogger(__name__)


def transcript_key(job_id: str, attempt: int) -> str:
    # Per attempt, so a worker that lost its entry can never overwrite the transcript the new owner completes.
    return f"transcripts/{job_id}.{attempt}.json"


class Runner:
    """The worker's ``execute``: store (through the local file cache) -> pool -> store."""

    def __init__(self, store: ObjectStore, pool: TranscriberPool, cache: FileCache | None) -> None:
        self.store = store
        self.pool = pool
        self.cache = cache

    async def __call__(self, attempt: Attempt) -> dict[str, str]:
        source = attempt.fields["source"]
        local = self.store.local_path(source)
        if local is not None:
            transcript = await self._transcribe(attempt, local)
        elif self.cache is not None:
            # Leased: the file stays while the pool reads it, whatever the cache evicts meanwhile.
            async with self.cache.lease(source, lambda tmp: self.store.fetch(source, tmp)) as path:
                transcript = await self._transcribe(attempt, path)
        else:
            raise RuntimeError("a store without local paths needs a file cache")
        key = transcript_key(attempt.job_id, attempt.number)
        await self.store.put_bytes(key, msgspec.json.encode(transcript))
        return {"transcript": key, "duration": repr(transcript.duration), "language": transcript.language}

    async def _transcribe(self, attempt: Attempt, path: Path) -> Transcript:
        f = attempt.fields
        return await self.pool.transcribe(
            path,
            f["model"],
            f.get("language") or "en",
            on_progress=lambda done, duration: attempt.report(done / duration),
            abort=attempt.aborted,
        )

    def __repr__(self) -> str:
        return f"Runner(store={self.store!r}, pool={self.pool!r}, cache={self.cache!r})"
