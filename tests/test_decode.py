"""transcoder.decode against real files in every format the fixtures make, and against bad input."""

from __future__ import annotations

import random
import struct
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.audio_fixtures import BAD_FILES, FORMAT_FILES
from transcoder.decode import SAMPLE_RATE, AudioInfo, TruncatedAudio, decode, decode_with_info, probe
from transcoder.errors import DecodeError, EmptyAudio, NoAudioStream

# mp3/aac encoders pad the start and end; ffmpeg trims what the headers describe, not always all of it.
DURATION_TOLERANCE_S = 0.2

# A bad file is refused from its headers or one short pass, never after a long struggle.
BAD_FILE_MAX_S = 2.0

ERROR_CLASSES = {
    "empty_audio": EmptyAudio,
    "undecodable_audio": DecodeError,
    "no_audio_stream": NoAudioStream,
    "truncated_audio": TruncatedAudio,
}


def wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def write_float_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """A WAVE_FORMAT_IEEE_FLOAT file (the wave module writes integer PCM only); samples: (frames, channels)."""
    frames, channels = samples.shape
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * 4, channels * 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def reference(audio_dir: Path) -> np.ndarray:
    """speech.wav decoded: the 16 kHz mono original every format variant was made from."""
    return decode(audio_dir / "speech.wav")


@pytest.mark.parametrize("name", sorted(FORMAT_FILES))
def test_format_decodes_to_16k_mono_float(audio_dir: Path, reference: np.ndarray, name: str) -> None:
    samples = decode(audio_dir / name)

    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert samples.flags.c_contiguous  # whisper.cpp takes the buffer as it is
    assert abs(samples.size / SAMPLE_RATE - wav_duration(audio_dir / "speech.wav")) <= DURATION_TOLERANCE_S
    assert float(samples.min()) >= -1.0 and float(samples.max()) <= 1.0
    # The speech is there at about the original level (stereo made from mono is averaged back to it).
    assert 0.5 < rms(samples) / rms(reference) < 1.5


@pytest.mark.parametrize("name", sorted(FORMAT_FILES))
def test_probe_describes_stream(audio_dir: Path, name: str) -> None:
    spec = FORMAT_FILES[name]

    info = probe(audio_dir / name)

    assert (info.codec, info.sample_rate, info.channels) == (spec.codec, spec.sample_rate, spec.channels)
    assert info.duration is not None
    assert abs(info.duration - wav_duration(audio_dir / "speech.wav")) <= DURATION_TOLERANCE_S
    assert info.container


def test_decode_with_info_agrees_with_probe_and_decode(audio_dir: Path) -> None:
    samples, info = decode_with_info(audio_dir / "speech.mp4")

    assert info == probe(audio_dir / "speech.mp4")
    assert info.container == "mov,mp4,m4a,3gp,3g2,mj2"
    assert np.array_equal(samples, decode(audio_dir / "speech.mp4"))


def test_probe_accepts_str_path(audio_dir: Path) -> None:
    info = probe(str(audio_dir / "speech.flac"))

    assert isinstance(info, AudioInfo)
    assert (info.codec, info.container) == ("flac", "flac")


def test_lossless_variants_decode_to_the_same_samples(audio_dir: Path, reference: np.ndarray) -> None:
    for name in ("speech.flac", "speech_f32.wav"):
        assert np.allclose(decode(audio_dir / name), reference, atol=1e-6), name
    # 24-bit at 48 kHz goes through the resampler: equal up to its filter's ripple.
    resampled = decode(audio_dir / "speech_s24_48k.wav")
    assert np.corrcoef(resampled, reference)[0, 1] > 0.999


def test_stereo_is_downmixed_not_left_channel(audio_dir: Path, reference: np.ndarray) -> None:
    """speech_right_only.wav: left channel silent, the speech on the right.

    1. Decode it; a decoder keeping only the first channel would return silence.
    2. The speech is there, sample for sample, at half level: the downmix averages the channels.
    """
    samples = decode(audio_dir / "speech_right_only.wav")

    assert samples.size == reference.size
    assert np.corrcoef(samples, reference)[0, 1] > 0.999
    assert rms(samples) / rms(reference) == pytest.approx(0.5, abs=0.02)


def test_loud_stereo_downmix_does_not_clip(tmp_path: Path) -> None:
    """Identical channels at 0.9 of full scale come out at 0.9, not summed to 1.27 and clipped."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = 0.9 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "loud.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.repeat(tone[:, None], 2, axis=1) * 32767).astype("<i2").tobytes())

    samples = decode(path)

    assert float(np.abs(samples).max()) == pytest.approx(0.9, abs=0.01)


def test_float_input_beyond_full_scale_is_clipped(tmp_path: Path) -> None:
    path = tmp_path / "hot.wav"
    write_float_wav(path, np.linspace(-3, 3, SAMPLE_RATE, dtype=np.float32)[:, None], SAMPLE_RATE)

    samples = decode(path)

    assert float(samples.min()) == -1.0 and float(samples.max()) == 1.0


def test_many_channels_are_downmixed(tmp_path: Path) -> None:
    """Six channels without a channel mask (ffmpeg: "6 channels"), speech-like noise on the fifth only."""
    rng = np.random.default_rng(7)
    signal = rng.uniform(-0.5, 0.5, SAMPLE_RATE).astype(np.float32)
    channels = np.zeros((SAMPLE_RATE, 6), dtype=np.float32)
    channels[:, 4] = signal
    path = tmp_path / "six.wav"
    write_float_wav(path, channels, SAMPLE_RATE)

    samples = decode(path)

    assert samples.size == SAMPLE_RATE
    assert np.corrcoef(samples, signal)[0, 1] > 0.99


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_refused_with_its_code(audio_dir: Path, name: str) -> None:
    code = BAD_FILES[name]
    started = time.perf_counter()

    with pytest.raises(DecodeError) as caught:
        decode(audio_dir / name)

    assert time.perf_counter() - started < BAD_FILE_MAX_S
    assert type(caught.value) is ERROR_CLASSES[code]
    assert caught.value.code == code
    assert caught.value.retryable is False
    assert name in str(caught.value)


def test_no_audio_stream_lists_the_streams(audio_dir: Path) -> None:
    with pytest.raises(NoAudioStream, match=r"no audio stream in video_only\.mp4 \(streams: video h264\)"):
        decode(audio_dir / "video_only.mp4")


def test_undecodable_message_says_what_ffmpeg_said(audio_dir: Path) -> None:
    with pytest.raises(DecodeError, match="garbage.wav.*ffmpeg says 'Invalid data found when processing input'"):
        decode(audio_dir / "garbage.wav")


@pytest.mark.parametrize("name", ["empty.wav", "garbage.wav", "text.wav", "video_only.mp4"])
def test_probe_refuses_what_decode_refuses(audio_dir: Path, name: str) -> None:
    with pytest.raises(DecodeError) as caught:
        probe(audio_dir / name)

    assert caught.value.code == BAD_FILES[name]


def test_probe_reads_declared_length_of_truncated_file(audio_dir: Path) -> None:
    """probe only reads headers: a truncated MP3 still reports the length its Xing frame declares."""
    info = probe(audio_dir / "truncated.mp3")

    assert info.duration == pytest.approx(wav_duration(audio_dir / "long.wav"), abs=DURATION_TOLERANCE_S)


def test_missing_file_is_an_os_error_not_bad_audio(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        decode(tmp_path / "nowhere.wav")
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "nowhere.wav")


def test_streaming_wav_with_unknown_size_is_not_truncated(audio_dir: Path, tmp_path: Path) -> None:
    """A WAV written to a pipe has 0xFFFFFFFF as its data size: no declared length, nothing truncated."""
    data = bytearray((audio_dir / "speech.wav").read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"
    data[4:8] = b"\xff\xff\xff\xff"
    path = tmp_path / "piped.wav"
    path.write_bytes(data)

    samples = decode(path)

    assert samples.size / SAMPLE_RATE == pytest.approx(wav_duration(audio_dir / "speech.wav"), abs=0.01)


def corrupt(src: Path, dst: Path, fraction: float) -> Path:
    """Copy ``src`` with ``fraction`` of its bytes, from a fifth of the way in, replaced by random ones."""
    data = bytearray(src.read_bytes())
    start, length = len(data) // 5, int(len(data) * fraction)
    data[start : start + length] = random.Random(1).randbytes(length)
    dst.write_bytes(data)
    return dst


def test_a_few_corrupt_packets_are_tolerated(audio_dir: Path, tmp_path: Path) -> None:
    samples = decode(corrupt(audio_dir / "long.mp3", tmp_path / "scratched.mp3", 0.02))

    assert samples.size / SAMPLE_RATE == pytest.approx(wav_duration(audio_dir / "long.wav"), abs=1.0)
    assert float(np.abs(samples).max()) <= 1.0


@pytest.mark.parametrize("name", ["long.mp3", "speech.flac", "speech.m4a", "speech_vorbis.ogg"])
def test_mostly_corrupt_stream_is_refused(audio_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(DecodeError):
        decode(corrupt(audio_dir / name, tmp_path / name, 0.8))


def test_sample_rate_change_mid_stream(audio_dir: Path, tmp_path: Path) -> None:
    """Two MP3s at different rates back to back (as `cat a.mp3 b.mp3` makes): both halves come out at 16 kHz."""
    other = tmp_path / "speech_8k.mp3"
    ffmpeg("-i", str(audio_dir / "speech.wav"), "-ar", "8000", "-c:a", "libmp3lame", "-write_xing", "0", str(other))
    joined = tmp_path / "joined.mp3"
    joined.write_bytes((audio_dir / "speech.mp3").read_bytes() + other.read_bytes())

    samples = decode(joined)

    expected = 2 * wav_duration(audio_dir / "speech.wav")
    assert samples.size / SAMPLE_RATE == pytest.approx(expected, abs=2 * DURATION_TOLERANCE_S)
