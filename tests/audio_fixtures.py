"""Audio fixtures: known sentences spoken by espeak-ng, converted by ffmpeg into many formats, plus bad inputs.

The files are generated once into ``~/.cache/v2t-node-tests/audio-<hash>`` (``$XDG_CACHE_HOME`` is honoured)
and reused by later runs; the hash covers everything that shapes the output (sentences, encoder arguments,
tool versions), so changing any of them regenerates. Generation writes into a temporary directory that is
renamed into place only when complete, so an interrupted run never leaves a half-filled cache behind.

Use ``audio_dir`` for the directory, ``FORMAT_FILES`` for the good files (each with what ``probe`` should
report), ``BAD_FILES`` for the inputs that must be refused (each with the expected error ``code``) and ``wer``
to score a transcript against a sentence.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import NamedTuple

import jiwer
import pytest

# Plain English without digits, so a transcript never has to agree with the reference on "7" versus "seven".
SENTENCES: dict[str, str] = {
    "fox": "The quick brown fox jumps over the lazy dog near the river bank.",
    "umbrella": "Please remember to bring an umbrella because the sky looks very cloudy this afternoon.",
    "library": "She walked to the library on a quiet morning to return her old books.",
    "garden": "My neighbour grows fresh tomatoes and green beans in his small garden.",
}

# The sentence spoken in speech.wav and every format variant of it.
SPEECH_SENTENCE = "umbrella"

SAMPLE_RATE = 16000

# Bump to force regeneration when the generator changes in a way the hash below does not see.
_GENERATOR_VERSION = 2


class AudioSpec(NamedTuple):
    """What a good fixture file holds, as ``transcoder.decode.probe`` should report it."""

    codec: str
    sample_rate: int
    channels: int


# The good files: each is speech.wav (SENTENCES[SPEECH_SENTENCE]) in another container/codec/rate/layout.
FORMAT_FILES: dict[str, AudioSpec] = {
    "speech.wav": AudioSpec("pcm_s16le", 16000, 1),
    "speech_8k.wav": AudioSpec("pcm_s16le", 8000, 1),
    "speech_44k_stereo.wav": AudioSpec("pcm_s16le", 44100, 2),
    "speech_s24_48k.wav": AudioSpec("pcm_s24le", 48000, 1),
    "speech_f32.wav": AudioSpec("pcm_f32le", 16000, 1),
    "speech_u8.wav": AudioSpec("pcm_u8", 16000, 1),
    "speech.mp3": AudioSpec("mp3", 16000, 1),
    "speech.m4a": AudioSpec("aac", 16000, 1),
    "speech.ogg": AudioSpec("opus", 48000, 1),
    "speech_vorbis.ogg": AudioSpec("vorbis", 16000, 1),
    "speech.flac": AudioSpec("flac", 16000, 1),
    "speech.webm": AudioSpec("opus", 48000, 1),
    "speech.mp4": AudioSpec("aac", 16000, 1),
}

# Other good files that are not format variants of speech.wav.
#   speech_right_only.wav: stereo, left channel silent, speech on the right (a decoder that keeps only the
#                          first channel returns silence).
#   long.wav / long.mp3:   every sentence in one clip (~15 s), the source of the truncated files.
#   <sentence>.wav:        one 16 kHz mono file per entry of SENTENCES.
EXTRA_FILES = ("speech_right_only.wav", "long.wav", "long.mp3")

# Inputs that must be refused, with the error code they must be refused with.
BAD_FILES: dict[str, str] = {
    "empty.wav": "empty_audio",  # 0 bytes
    "no_samples.wav": "empty_audio",  # a valid WAV header with no sample data
    "garbage.wav": "undecodable_audio",  # deterministic random bytes
    "text.wav": "undecodable_audio",  # a text file with an audio extension
    "truncated.wav": "truncated_audio",  # the first 40 % of long.wav's bytes
    "truncated.mp3": "truncated_audio",  # the first 40 % of long.mp3's bytes
    "video_only.mp4": "no_audio_stream",  # an H.264 video without an audio track
}

# ffmpeg output arguments for each format variant, all made from speech.wav (16 kHz mono s16).
_ENCODINGS: dict[str, list[str]] = {
    "speech_8k.wav": ["-ar", "8000", "-c:a", "pcm_s16le"],
    "speech_44k_stereo.wav": ["-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le"],
    "speech_s24_48k.wav": ["-ar", "48000", "-c:a", "pcm_s24le"],
    "speech_f32.wav": ["-c:a", "pcm_f32le"],
    "speech_u8.wav": ["-c:a", "pcm_u8"],
    "speech.mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "speech.m4a": ["-c:a", "aac", "-b:a", "64k"],
    "speech.ogg": ["-c:a", "libopus", "-b:a", "32k"],
    "speech_vorbis.ogg": ["-c:a", "libvorbis", "-q:a", "4"],
    "speech.flac": ["-c:a", "flac"],
    "speech.webm": ["-c:a", "libopus", "-b:a", "32k"],
    "speech_right_only.wav": ["-af", "pan=stereo|c0=0*c0|c1=c0", "-c:a", "pcm_s16le"],
}

_VIDEO_SOURCE = "color=c=navy:s=64x64:r=10"
_TRUNCATE_FRACTION = 0.4


def _run(args: list[str]) -> str:
    """Run a generator tool, failing the test session with its stderr if it fails."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError(f"{args[0]} is not installed; the audio fixtures need espeak-ng and ffmpeg") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _ffmpeg(*args: str) -> None:
    _run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args])


def _speak(text: str, out: Path) -> None:
    """Speak ``text`` with espeak-ng (22.05 kHz) and convert it to 16 kHz mono 16-bit WAV."""
    raw = out.with_name(out.stem + ".espeak.wav")
    _run(["espeak-ng", "-v", "en-us", "-w", str(raw), text])
    _ffmpeg("-i", str(raw), "-ar", str(SAMPLE_RATE), "-ac", "1", "-c:a", "pcm_s16le", str(out))
    raw.unlink()


def _wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def _truncate(src: Path, dst: Path, fraction: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])


def _generate(out: Path) -> None:
    """Write every fixture file into ``out`` (an empty directory)."""
    speech = out / "speech.wav"
    _speak(SENTENCES[SPEECH_SENTENCE], speech)
    for name, text in SENTENCES.items():
        if name != SPEECH_SENTENCE:
            _speak(text, out / f"{name}.wav")
        else:
            shutil.copyfile(speech, out / f"{name}.wav")

    for name, args in _ENCODINGS.items():
        _ffmpeg("-i", str(speech), *args, str(out / name))

    # Video with sound: a solid colour as long as the speech, H.264 + AAC in MP4.
    duration = f"{_wav_duration(speech):.3f}"
    _ffmpeg(
        "-f", "lavfi", "-t", duration, "-i", _VIDEO_SOURCE, "-i", str(speech),
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "64k", "-shortest", str(out / "speech.mp4"),
    )  # fmt: skip
    _ffmpeg(
        "-f", "lavfi", "-t", "2", "-i", _VIDEO_SOURCE,
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", str(out / "video_only.mp4"),
    )  # fmt: skip

    # A long clip whose headers declare its full length (WAV data size, LAME's Xing frame count), so that
    # cutting it leaves a file that says it is longer than what it holds.
    long_wav = out / "long.wav"
    _speak(" ".join(SENTENCES.values()), long_wav)
    _ffmpeg("-i", str(long_wav), "-c:a", "libmp3lame", "-b:a", "64k", str(out / "long.mp3"))
    _truncate(long_wav, out / "truncated.wav", _TRUNCATE_FRACTION)
    _truncate(out / "long.mp3", out / "truncated.mp3", _TRUNCATE_FRACTION)

    (out / "empty.wav").write_bytes(b"")
    with wave.open(str(out / "no_samples.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
    (out / "garbage.wav").write_bytes(random.Random(20240229).randbytes(64 * 1024))
    (out / "text.wav").write_text(
        "This is not audio.\nIt is a plain text file that somebody saved with a .wav extension.\n" * 20
    )


def _tool_version(tool: str) -> str:
    return _run([tool, "--version" if tool == "espeak-ng" else "-version"]).splitlines()[0]


def _settings_hash() -> str:
    """A hash of everything that shapes the generated files, naming the cache directory."""
    h = hashlib.sha256()
    parts = [
        str(_GENERATOR_VERSION),
        repr(sorted(SENTENCES.items())),
        SPEECH_SENTENCE,
        repr(sorted(_ENCODINGS.items())),
        _VIDEO_SOURCE,
        repr(_TRUNCATE_FRACTION),
        _tool_version("espeak-ng"),
        _tool_version("ffmpeg"),
    ]
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "v2t-node-tests"


def build_audio_dir(root: Path) -> Path:
    """Return ``root/audio-<hash>``, generating it first unless a complete copy is already there."""
    final = root / f"audio-{_settings_hash()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=root))
    try:
        _generate(tmp)
        try:
            tmp.rename(final)
        except OSError:
            # Another session finished first (rename onto a non-empty directory fails); theirs is as good.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding every fixture file (see the module docstring)."""
    try:
        return build_audio_dir(_cache_root())
    except OSError:
        # A read-only or missing home (some CI sandboxes): generate for this session only.
        return build_audio_dir(tmp_path_factory.mktemp("audio"))


_NORMALISE = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference``, ignoring case, punctuation and spacing.

    An empty hypothesis scores 1.0 (every word missed); an empty reference is a mistake in the test.
    """
    if not reference.strip():
        raise ValueError("wer() needs a non-empty reference sentence")
    if not jiwer.RemovePunctuation()(hypothesis).strip():
        return 1.0
    return float(
        jiwer.wer(reference, hypothesis, reference_transform=_NORMALISE, hypothesis_transform=_NORMALISE)
    )


#: What long_audio says: every sentence, four times over.
LONG_TEXT = " ".join([" ".join(SENTENCES.values())] * 4)
#: tiny.en hears espeak's "quick brown fox jumps" as "quick roundfark stump" (faster-whisper does too), so the
#: long clip, which repeats that sentence, scores about 0.3; the other sentences score below 0.1.
LONG_WER = 0.35


@pytest.fixture(scope="session")
def long_audio(audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About a minute of speech (long.wav four times): long enough to cancel, kill or stop a node mid-way."""
    out = tmp_path_factory.mktemp("long") / "minute.wav"
    src = str(audio_dir / "long.wav")
    subprocess.run(["sox", src, src, src, src, str(out)], check=True)
    return out
