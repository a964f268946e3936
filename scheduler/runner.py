"""What one attempt does: fetch the audio, transcribe it in the pool, store the transcript."""

import logging
import tempfile
from pathlib import Path

import msgspec

from cache.store import ObjectStore
from transcoder.pool import TranscriberPool

from .worker import Attempt

log = logging.getLogger(__name__)


def transcript_key(job_id: str, attempt: int) -> str:
    # Per attempt, so a worker that lost its entry can never overwrite the transcript the new owner completes.
    return f"transcripts/{job_id}.{attempt}.json"


class Runner:
    """The worker's ``execute``: store -> pool -> store."""

    def __init__(self, store: ObjectStore, pool: TranscriberPool, scratch: Path) -> None:
        self.store = store
        self.pool = pool
        self.scratch = scratch

    async def __call__(self, attempt: Attempt) -> dict[str, str]:
        f = attempt.fields
        local = self.store.local_path(f["source"])
        tmp: Path | None = None
        if local is None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkstemp(dir=self.scratch, prefix=f"{attempt.job_id}-")[1])
            local = await self.store.fetch(f["source"], tmp)
        try:
            transcript = await self.pool.transcribe(
                local,
                f["model"],
                f.get("language") or "en",
                on_progress=lambda done, duration: attempt.report(done / duration),
                abort=attempt.aborted,
            )
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        key = transcript_key(attempt.job_id, attempt.number)
        await self.store.put_bytes(key, msgspec.json.encode(transcript))
        return {"transcript": key, "duration": repr(transcript.duration), "language": transcript.language}

    def __repr__(self) -> str:
        return f"Runner(store={self.store!r}, pool={self.pool!r})"
