"""The job record: its states, its wire form, and its Redis hash encoding."""

import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

State = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

#: Client-chosen ids: short, URL- and key-safe.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID.pattern)]


class JobError(msgspec.Struct, frozen=True):
    """Why a job (or its last attempt) failed."""

    code: str
    message: str


class Job(msgspec.Struct, frozen=True, omit_defaults=False):
    """A job as the API shows it."""

    id: str
    state: State
    progress: float = 0.0
    attempts: int = 0
    model: str = ""
    language: str = ""
    duration: float | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    node: str | None = None
    error: JobError | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    cached: bool = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class JobSpec(msgspec.Struct, frozen=True):
    """What a submission asks for, after validation: the audio already sits in the object store."""

    id: str
    source: str  # object-store key of the audio
    model: str
    language: str
    filename: str
    size: int
    sha256: str

    @property
    def options(self) -> str:
        """The decode options that change the transcript; part of the result-cache key."""
        return options_key(self.language)


def options_key(language: str) -> str:
    """Canonical form of the options that change a transcript (the result cache is keyed by it)."""
    return f"lang={language}"


def now() -> float:
    return time.time()


def text(value: object) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(v: bytes | str | None) -> float | None:
    if v is None or v == b"" or v == "":
        return None
    return float(v)


def _str(v: bytes | str | None) -> str | None:
    if v is None:
        return None
    s = v.decode() if isinstance(v, bytes) else v
    return s or None


def from_hash(job_id: str, h: Mapping[Any, Any]) -> Job:
    """Decodes a job hash (as HGETALL returns it) into the API's view."""
    g = {text(k): v for k, v in h.items()}
    code, message = _str(g.get("error_code")), _str(g.get("error"))
    return Job(
        id=job_id,
        state=text(g["state"]),  # type: ignore[arg-type]
        progress=_float(g.get("progress")) or 0.0,
        attempts=int(g.get("attempt", b"0")),
        model=_str(g.get("model")) or "",
        language=_str(g.get("language")) or "",
        duration=_float(g.get("duration")),
        created_at=_float(g.get("created_at")),
        started_at=_float(g.get("started_at")),
        finished_at=_float(g.get("finished_at")),
        node=_str(g.get("node")),
        error=JobError(code or "error", message or "") if code or message else None,
        filename=_str(g.get("filename")),
        size=int(g["size"]) if g.get("size") else None,
        sha256=_str(g.get("sha256")),
        cached=g.get("cached") == b"1",
    )
