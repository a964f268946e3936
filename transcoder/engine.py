"""whisper.cpp in this process: loads models (keeping a few resident) and turns samples into a Transcript.

The pool runs one Engine per worker process; bench.sh runs one bare, as the baseline.
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Aborted, ModelFormatError
from .transcript import Segment, Transcript

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000

#: Decoding parameters that do not vary per job. Greedy decoding, no carried context between windows (which
#: whisper.cpp documents as the more robust choice for long files), non-speech tokens suppressed.
BASE_PARAMS: dict[str, Any] = {
    "print_progress": False,
    "print_realtime": False,
    "print_timestamps": False,
    "no_context": True,
    "suppress_nst": True,
}


def _load(path: Path, threads: int):  # type: ignore[no-untyped-def]
    from pywhispercpp.model import Model  # imported here: the parent process never loads whisper.cpp

    if not path.is_file():
        raise ModelFormatError(f"model file {path} does not exist")
    model = Model(str(path), redirect_whispercpp_logs_to=None, n_threads=threads, **BASE_PARAMS)
    if model._ctx is None:  # type: ignore[attr-defined]  # whisper.cpp returns NULL for a file it cannot read
        raise ModelFormatError(f"whisper.cpp could not load {path}: not a ggml whisper model?")
    return model


class Engine:
    """Resident whisper.cpp models (least recently used dropped first) and the transcription call."""

    def __init__(self, threads: int, max_models: int = 2) -> None:
        self.threads = threads
        self.max_models = max_models
        self._models: OrderedDict[Path, tuple[object, float]] = OrderedDict()
        self.transcribed = 0

    def model(self, path: Path):  # type: ignore[no-untyped-def]
        """The loaded model for ``path``, loading it (and evicting the least recently used) if needed."""
        path = Path(path)
        if path in self._models:
            model, _ = self._models.pop(path)
        else:
            t0 = time.monotonic()
            model = _load(path, self.threads)
            log.info("loaded %s in %.2fs", path.name, time.monotonic() - t0)
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
        self._models[path] = (model, time.monotonic())
        return model

    def unload_idle(self, idle_s: float) -> int:
        """Drops models unused for ``idle_s`` seconds; returns how many."""
        cutoff = time.monotonic() - idle_s
        stale = [p for p, (_, used) in self._models.items() if used < cutoff]
        for p in stale:
            del self._models[p]
        return len(stale)

    def transcribe(
        self,
        samples: np.ndarray,
        model_path: Path,
        *,
        model_name: str,
        language: str = "en",
        on_segment: Callable[[float], None] | None = None,
        should_abort: Callable[[], bool] | None = None,
    ) -> Transcript:
        """Transcribes 16 kHz mono float32 ``samples``; ``on_segment`` gets the seconds done so far."""
        from .formats import strip_non_speech

        model = self.model(model_path)
        duration = len(samples) / SAMPLE_RATE

        def segment_done(seg) -> None:  # type: ignore[no-untyped-def]
            if on_segment is not None:
                on_segment(seg.t1 / 100.0)

        raw = model.transcribe(  # type: ignore[attr-defined]
            np.ascontiguousarray(samples, dtype=np.float32),
            new_segment_callback=segment_done if on_segment is not None else None,
            abort_callback=should_abort,
            language=language,
            n_threads=self.threads,
        )
        if should_abort is not None and should_abort():
            raise Aborted("transcription aborted")
        segments = []
        for s in raw:
            text = strip_non_speech(s.text)
            if text:
                segments.append(Segment(start=s.t0 / 100.0, end=min(s.t1 / 100.0, duration), text=text))
        detected = language
        if language in ("", "auto"):
            import _pywhispercpp as pw

            detected = pw.whisper_lang_str(pw.whisper_full_lang_id(model._ctx))  # type: ignore[attr-defined]
        self.transcribed += 1
        return Transcript(
            text=" ".join(s.text for s in segments),
            segments=tuple(segments),
            duration=duration,
            model=model_name,
            language=detected,
        )

    def __repr__(self) -> str:
        names = [p.name for p in self._models]
        return f"Engine(threads={self.threads}, models={names}, transcribed={self.transcribed})"
