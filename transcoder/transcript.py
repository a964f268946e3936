"""The transcript: what a finished job produces, stored as JSON and rendered to txt/srt/vtt."""

import msgspec


class Segment(msgspec.Struct, frozen=True):
    """One stretch of speech; times in seconds from the start of the audio."""

    start: float
    end: float
    text: str


class Transcript(msgspec.Struct, frozen=True):
    """A whole transcription."""

    text: str
    segments: tuple[Segment, ...]
    duration: float
    model: str
    language: str = "en"
