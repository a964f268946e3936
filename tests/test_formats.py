"""transcoder.formats: exact renderings of a small transcript, and non-speech marker removal."""

from __future__ import annotations

import msgspec
import pytest

from transcoder.formats import CONTENT_TYPES, FORMATS, render, strip_non_speech
from transcoder.transcript import Segment, Transcript

TRANSCRIPT = Transcript(
    text="Hello world. Over an hour in. The end.",
    segments=(
        Segment(0.0, 2.5, " Hello world."),
        Segment(3661.2345, 3662.0004, " Over an hour in."),  # halves round up; 0.4 ms rounds down
        Segment(3662.0, 3675.9996, " The end."),  # 0.9996 s rounds up into the next second
    ),
    duration=3676.0,
    model="tiny.en",
)


def test_formats_and_content_types_match() -> None:
    assert FORMATS == ("json", "txt", "srt", "vtt")
    assert set(CONTENT_TYPES) == set(FORMATS)
    assert CONTENT_TYPES["txt"] == "text/plain; charset=utf-8"
    assert CONTENT_TYPES["vtt"] == "text/vtt"


def test_json_round_trips() -> None:
    body = render(TRANSCRIPT, "json")

    assert isinstance(body, bytes)
    assert msgspec.json.decode(body, type=Transcript) == TRANSCRIPT
    assert msgspec.json.decode(body)["segments"][0] == {"start": 0.0, "end": 2.5, "text": " Hello world."}


def test_txt() -> None:
    assert render(TRANSCRIPT, "txt") == "Hello world.\nOver an hour in.\nThe end.\n"


def test_srt() -> None:
    assert render(TRANSCRIPT, "srt") == (
        "1\n"
        "00:00:00,000 --> 00:00:02,500\n"
        "Hello world.\n"
        "\n"
        "2\n"
        "01:01:01,235 --> 01:01:02,000\n"
        "Over an hour in.\n"
        "\n"
        "3\n"
        "01:01:02,000 --> 01:01:16,000\n"
        "The end.\n"
        "\n"
    )


def test_vtt() -> None:
    assert render(TRANSCRIPT, "vtt") == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.500\n"
        "Hello world.\n"
        "\n"
        "01:01:01.235 --> 01:01:02.000\n"
        "Over an hour in.\n"
        "\n"
        "01:01:02.000 --> 01:01:16.000\n"
        "The end.\n"
        "\n"
    )


def test_empty_segments_are_skipped_and_cues_renumbered() -> None:
    t = Transcript(
        text="One. Two.",
        segments=(Segment(0.0, 1.0, " One."), Segment(1.0, 2.0, "  "), Segment(2.0, 3.0, " Two.")),
        duration=3.0,
        model="tiny.en",
    )

    assert render(t, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,000\nOne.\n\n2\n00:00:02,000 --> 00:00:03,000\nTwo.\n\n"
    )
    assert render(t, "txt") == "One.\nTwo.\n"


def test_cue_text_cannot_break_the_cue() -> None:
    t = Transcript(
        text="",
        segments=(Segment(0.0, 1.0, " a --> b\n\n<i> & c"),),
        duration=1.0,
        model="tiny.en",
    )

    assert render(t, "srt") == "1\n00:00:00,000 --> 00:00:01,000\na -> b\n<i> & c\n\n"
    assert render(t, "vtt") == "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\na -&gt; b\n&lt;i&gt; &amp; c\n\n"


def test_no_segments() -> None:
    t = Transcript(text=" Just text. ", segments=(), duration=1.0, model="tiny.en")

    assert render(t, "txt") == "Just text.\n"
    assert render(t, "srt") == ""
    assert render(t, "vtt") == "WEBVTT\n\n"


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown transcript format 'docx'; use one of json, txt, srt, vtt"):
        render(TRANSCRIPT, "docx")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[BLANK_AUDIO]", ""),
        (" [MUSIC] ", ""),
        ("[ Silence ]", ""),
        ("(music)", ""),
        ("(upbeat music) Hello there.", "Hello there."),
        ("I said [inaudible] twice.", "I said twice."),
        ("Well *laughs* that was   fun.", "Well that was fun."),
        ("(speaking in foreign language) Bonjour.", "Bonjour."),
        ("  Ordinary   words\nstay.  ", "Ordinary words stay."),
        ("Music and blank audio are words.", "Music and blank audio are words."),
        ("In (2019) at [00:01], 2 * 3 * 4 held.", "In (2019) at [00:01], 2 * 3 * 4 held."),
        ("", ""),
    ],
)
def test_strip_non_speech(text: str, expected: str) -> None:
    assert strip_non_speech(text) == expected
