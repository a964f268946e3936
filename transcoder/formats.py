"""Transcript formats: JSON, plain text, SubRip and WebVTT, and the removal of whisper's non-speech markers."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import msgspec

from transcoder.transcript import Segment, Transcript

__all__ = ["CONTENT_TYPES", "FORMATS", "render", "strip_non_speech", "to_json", "to_srt", "to_txt", "to_vtt"]

FORMATS: Final = ("json", "txt", "srt", "vtt")
"""The formats ``render`` knows, in the order the API lists them."""

CONTENT_TYPES: Final[dict[str, str]] = {
    "json": "application/json",
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip",
    "vtt": "text/vtt",
}
"""The HTTP Content-Type of each format."""


def to_json(t: Transcript) -> bytes:
    """The transcript as JSON: the ``Transcript`` struct's msgspec encoding."""
    return msgspec.json.encode(t)


def to_txt(t: Transcript) -> str:
    """One line per segment; the whole text on one line when there are no segments."""
    lines = [text for text in (_cue_text(s.text) for s in t.segments) if text]
    if not lines and t.text.strip():
        lines = [_cue_text(t.text)]
    return "".join(f"{line}\n" for line in lines)


def to_srt(t: Transcript) -> str:
    """SubRip: numbered cues from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each."""
    cues = []
    for index, (segment, text) in enumerate(_cues(t), start=1):
        start, end = _span(segment)
        cues.append(f"{index}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n\n")
    return "".join(cues)


def to_vtt(t: Transcript) -> str:
    """WebVTT: the ``WEBVTT`` header, then ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` cues."""
    cues = ["WEBVTT\n\n"]
    for segment, text in _cues(t):
        start, end = _span(segment)
        # '&', '<' and '>' are markup in WebVTT cue text.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        cues.append(f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{text}\n\n")
    return "".join(cues)


_RENDERERS: Final[dict[str, Callable[[Transcript], bytes | str]]] = {
    "json": to_json,
    "txt": to_txt,
    "srt": to_srt,
    "vtt": to_vtt,
}


def render(t: Transcript, fmt: str) -> bytes | str:
    """Render ``t`` as ``fmt`` (one of ``FORMATS``): ``bytes`` for json, ``str`` for the text formats.

    Raises ValueError for an unknown format.
    """
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise ValueError(f"unknown transcript format {fmt!r}; use one of {', '.join(FORMATS)}") from None
    return renderer(t)


def _cues(t: Transcript) -> list[tuple[Segment, str]]:
    # A cue without text would read as the blank line that ends a cue; leave such segments out.
    return [(s, text) for s in t.segments if (text := _cue_text(s.text))]


def _cue_text(text: str) -> str:
    # Whisper's segments start with a space; an empty line or "-->" inside a cue would break its parsing.
    lines = (line.strip() for line in text.replace("-->", "->").splitlines())
    return "\n".join(line for line in lines if line)


def _span(segment: Segment) -> tuple[float, float]:
    start = max(0.0, segment.start)
    return start, max(start, segment.end)


def _timestamp(seconds: float, decimal_mark: str) -> str:
    # Nearest millisecond, halves up. Binary floats put 1.2345 s at 1234.4999... ms, so first round away that
    # representation error, then round half up (round() alone would round halves to even).
    ms = int(round(max(0.0, seconds) * 1000, 3) + 0.5)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{ms:03d}"


# A marker's content: a few words, starting with a letter and ending with a letter or digit, so that numbers,
# timestamps and arithmetic ("(2019)", "[00:01]", "2 * 3 * 4") are never taken for markers.
_MARKER_WORDS: Final = r"[^\W\d_](?:[\w '’\-]{0,48}[^\W_])?"
_NON_SPEECH: Final = re.compile(
    rf"\[\s*{_MARKER_WORDS}\s*\]"  # [BLANK_AUDIO], [MUSIC], [ Silence ], [inaudible]
    rf"|\(\s*{_MARKER_WORDS}\s*\)"  # (music), (upbeat music), (speaking in foreign language)
    rf"|\*{_MARKER_WORDS}\*"  # *laughs*, *door closes*
)
_WHITESPACE: Final = re.compile(r"\s+")


def strip_non_speech(text: str) -> str:
    """Remove whisper's non-speech markers (``[BLANK_AUDIO]``, ``(music)``, ``*laughs*``, ...) and collapse
    whitespace. Only whole bracketed, parenthesised or asterisk-wrapped markers go; words stay.
    """
    return _WHITESPACE.sub(" ", _NON_SPEECH.sub(" ", text)).strip()
