"""Audio decoding: any container/codec ffmpeg reads, in-process through PyAV, to 16 kHz mono float32.

whisper.cpp wants 16 kHz mono float32 samples in [-1, 1]. ``decode`` produces them from whatever a client
uploaded (WAV of any rate and sample width, MP3, AAC, Opus, Vorbis, FLAC, WebM, a video with a sound track),
``probe`` says what a file holds without decoding it, and both raise the transcoder's ``DecodeError`` family
for input that can never be transcribed, so the scheduler fails such jobs at once instead of retrying them.

A path that does not exist, or another I/O failure, raises the ``OSError`` as it is: that is a problem of the
node (a cache file gone, a full disk), not of the audio.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Final

import av
import av.container
import av.error
import msgspec
import numpy as np
import numpy.typing as npt

from transcoder.errors import DecodeError, EmptyAudio, NoAudioStream

__all__ = [
    "SAMPLE_RATE",
    "AudioInfo",
    "TruncatedAudio",
    "decode",
    "decode_with_info",
    "probe",
]

SAMPLE_RATE: Final = 16000
"""The sample rate whisper.cpp expects, in Hz."""

# A file counts as cut short when it decodes to less than its headers declare by more than this much;
# below it, differences are encoder padding and rounding.
TRUNCATION_MIN_S: Final = 0.5
TRUNCATION_FRACTION: Final = 0.05

# Tolerate the odd corrupt packet (a damaged frame in a long recording), but not a stream that is mostly noise
# to the decoder: then what comes out is not the recording.
MAX_BAD_PACKET_FRACTION: Final = 0.5

# Container formats whose duration is stated by the file (headers, or Ogg's last granule position) rather than
# guessed by ffmpeg from the bit rate, which for VBR streams is far enough off to look like truncation. MP3 is
# trusted only with a Xing/Info/VBRI frame.
_DECLARING_FORMATS: Final = frozenset(
    {"wav", "w64", "flac", "ogg", "mov", "mp4", "m4a", "matroska", "webm", "aiff", "caf", "asf", "wv", "ape", "tta"}
)

# WAV writers that stream (to a pipe, a live recorder) put these in the data chunk size instead of the length.
_WAV_UNKNOWN_SIZES: Final = frozenset({0, 0xFFFFFFFF, 0x7FFFFFFF})

# For float output libswresample sums the channels unscaled (stereo to mono: 0.707 L + 0.707 R), so loud stereo
# would clip. A maximum matrix value of 1 makes the downmix an average, as whisper's reference
# `ffmpeg -ac 1` does.
_RESAMPLER_OPTIONS: Final = {"rematrix_maxval": "1.0"}

_MKV_DURATION_TAG: Final = re.compile(r"^(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


class TruncatedAudio(DecodeError):
    """The file decodes to clearly less audio than its headers declare: it was cut short."""

    code = "truncated_audio"


class AudioInfo(msgspec.Struct, frozen=True):
    """What a file's audio stream is, as far as its headers tell."""

    duration: float | None
    """Seconds, or None when the file does not say (a live stream, a headerless WAV)."""
    codec: str
    """ffmpeg's codec name: ``pcm_s16le``, ``mp3``, ``aac``, ``opus``, ..."""
    sample_rate: int
    channels: int
    container: str
    """ffmpeg's demuxer name: ``wav``, ``mp3``, ``ogg``, ``mov,mp4,m4a,3gp,3g2,mj2``, ``matroska,webm``, ..."""


def probe(path: str | os.PathLike[str]) -> AudioInfo:
    """Describe the first (best) audio stream of ``path`` without decoding it.

    Raises EmptyAudio for an empty file, NoAudioStream for a file without sound, DecodeError for anything
    ffmpeg cannot read, and OSError when the file cannot be read at all.
    """
    name = _display_name(path)
    with _open(path, name) as container:
        return _info(container, _audio_stream(container, name))


def decode(path: str | os.PathLike[str]) -> npt.NDArray[np.float32]:
    """Decode the first (best) audio stream of ``path`` to 16 kHz mono float32 samples in [-1, 1].

    Raises EmptyAudio (empty file, no samples), NoAudioStream, TruncatedAudio (a file cut short) or
    DecodeError (unreadable or mostly undecodable input); OSError when the file cannot be read at all.
    """
    return decode_with_info(path)[0]


def decode_with_info(path: str | os.PathLike[str]) -> tuple[npt.NDArray[np.float32], AudioInfo]:
    """``decode`` and ``probe`` in one pass over the file."""
    name = _display_name(path)
    with _open(path, name) as container:
        stream = _audio_stream(container, name)
        info = _info(container, stream)
        samples = _decode_stream(container, stream, name, info.duration)
        declared = _declared_duration(path, container, info)

    if samples.size == 0:
        raise EmptyAudio(f"{name} contains no audio samples; send a recording that is not empty")
    decoded = samples.size / SAMPLE_RATE
    if declared is not None and declared - decoded > max(TRUNCATION_MIN_S, TRUNCATION_FRACTION * declared):
        raise TruncatedAudio(
            f"{name} is cut short or damaged: it declares {declared:.1f} s of audio but only {decoded:.1f} s "
            "could be decoded (an interrupted upload or copy?); send the complete, intact file"
        )
    return samples, info


def _display_name(path: str | os.PathLike[str]) -> str:
    # Messages reach API clients: name the file, not the node's directory layout.
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def _is_environment_error(exc: BaseException) -> bool:
    """Whether an ffmpeg error is about the node (I/O, memory) rather than about the audio."""
    return isinstance(exc, (OSError, MemoryError))


def _ffmpeg_says(exc: av.error.FFmpegError) -> str:
    return exc.strerror or str(exc)


def _open(path: str | os.PathLike[str], name: str) -> av.container.InputContainer:
    # ffmpeg reports an empty file as "invalid data"; say what is really wrong. os.stat also raises the plain
    # FileNotFoundError for a missing path.
    if os.stat(path).st_size == 0:
        raise EmptyAudio(f"{name} is empty (0 bytes); send the file again")
    try:
        # Tags in a legacy encoding must not make an otherwise fine file unreadable.
        return av.open(os.fspath(path), mode="r", metadata_errors="replace")
    except av.error.FFmpegError as exc:
        if _is_environment_error(exc):
            raise
        raise DecodeError(
            f"cannot read {name} as audio: ffmpeg says {_ffmpeg_says(exc)!r}; "
            "send an audio or video file in a format ffmpeg reads (WAV, MP3, M4A, Ogg, FLAC, WebM, MP4, ...)"
        ) from exc


def _audio_stream(container: av.container.InputContainer, name: str) -> av.AudioStream:
    stream = container.streams.best("audio")
    if stream is None:
        found = ", ".join(f"{s.type} {_codec_name(s)}" for s in container.streams) or "none"
        raise NoAudioStream(f"no audio stream in {name} (streams: {found}); send a file with a sound track")
    if stream.codec_context is None:
        raise DecodeError(f"no decoder for the {_codec_name(stream)} audio in {name}; convert it to WAV or FLAC")
    return stream  # type: ignore[return-value]


def _codec_name(stream: av.stream.Stream) -> str:
    ctx = stream.codec_context
    # canonical_name is the codec's, not the decoder's ("mp3", not "mp3float").
    return ctx.codec.canonical_name if ctx is not None else "unknown"


def _info(container: av.container.InputContainer, stream: av.AudioStream) -> AudioInfo:
    ctx = stream.codec_context
    return AudioInfo(
        duration=_stream_duration(container, stream),
        codec=_codec_name(stream),
        sample_rate=ctx.sample_rate,
        channels=ctx.channels,
        container=container.format.name,
    )


def _stream_duration(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    """The audio stream's duration in seconds as the demuxer knows it, or None."""
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    # Matroska keeps per-stream durations in a tag that ffmpeg's own muxer writes.
    tag = _MKV_DURATION_TAG.match(stream.metadata.get("DURATION", ""))
    if tag:
        hours, minutes, seconds = tag.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    # The container's duration is the longest stream's: only the audio's when nothing else is there.
    if container.duration is not None and container.duration > 0 and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _declared_duration(
    path: str | os.PathLike[str], container: av.container.InputContainer, info: AudioInfo
) -> float | None:
    """The duration the file's headers promise, when they really state one (for the truncation check)."""
    formats = set(container.format.name.split(","))
    if "wav" in formats:
        # ffmpeg clamps a WAV's data size to the file size, hiding truncation; read what the header says.
        riff = _wav_header_duration(path)
        known = [d for d in (info.duration, riff) if d is not None]
        return max(known) if known else None
    if "mp3" in formats:
        return info.duration if _mp3_has_length_header(path) else None
    if formats & _DECLARING_FORMATS:
        return info.duration
    return None


def _wav_header_duration(path: str | os.PathLike[str]) -> float | None:
    """The length a RIFF/WAVE header declares (data chunk size / block size / rate), or None."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None  # RF64, Wave64: ffmpeg's own duration is used
        block_align = rate = 0
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                fmt = f.read(size + (size & 1))
                if len(fmt) < 14:
                    return None
                rate = struct.unpack_from("<I", fmt, 4)[0]
                block_align = struct.unpack_from("<H", fmt, 12)[0]
            elif chunk_id == b"data":
                if size in _WAV_UNKNOWN_SIZES or not rate or not block_align:
                    return None
                return size / block_align / rate
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)


def _mp3_has_length_header(path: str | os.PathLike[str]) -> bool:
    """Whether an MP3 has a Xing/Info/VBRI frame (frame count); without one ffmpeg guesses from the bit rate."""
    with open(path, "rb") as f:
        head = f.read(10)
        offset = 0
        if head[:3] == b"ID3" and len(head) == 10:
            # ID3v2 tag size is "syncsafe": 7 bits per byte; the tag may hold cover art, so skip it.
            offset = 10 + ((head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9])
        f.seek(offset)
        # The tag sits inside the first frame, at most ~200 bytes in; allow for junk before the frame.
        first = f.read(4096)
    return any(marker in first for marker in (b"Xing", b"Info", b"VBRI"))


class _SampleBuffer:
    """A float32 buffer that grows by doubling, so appending n samples costs O(n) in all."""

    def __init__(self, capacity: int) -> None:
        self._data = np.empty(max(capacity, SAMPLE_RATE), dtype=np.float32)
        self._size = 0

    def append(self, chunk: npt.NDArray[np.float32]) -> None:
        end = self._size + chunk.size
        if end > self._data.size:
            grown = np.empty(max(end, 2 * self._data.size), dtype=np.float32)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = chunk
        self._size = end

    def result(self) -> npt.NDArray[np.float32]:
        out = self._data[: self._size]
        # Hand back a compact array rather than a view pinning a much larger buffer for the whole job.
        if self._data.size - self._size > max(SAMPLE_RATE, self._size // 8):
            out = out.copy()
        return out


class _Resampler:
    """av.AudioResampler to 16 kHz mono float that survives a change of input format mid-stream.

    Streams can change rate or layout part-way (concatenated MP3s, HE-AAC switching): PyAV's resampler refuses
    frames unlike its first, so flush it into the buffer and start a new one.
    """

    def __init__(self, out: _SampleBuffer) -> None:
        self._out = out
        self._resampler: av.AudioResampler | None = None
        self._input: tuple[str, str, int] | None = None

    def push(self, frame: av.AudioFrame) -> None:
        shape = (frame.format.name, frame.layout.name, frame.rate)
        if shape != self._input:
            self.flush()
            self._resampler = av.AudioResampler(
                format="flt", layout="mono", rate=SAMPLE_RATE, options=_RESAMPLER_OPTIONS
            )
            self._input = shape
        assert self._resampler is not None
        self._emit(self._resampler.resample(frame))

    def flush(self) -> None:
        if self._resampler is not None:
            self._emit(self._resampler.resample(None))
            self._resampler = None
            self._input = None

    def _emit(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            self._out.append(frame.to_ndarray().reshape(-1))  # type: ignore[arg-type]  # format='flt'


def _decode_stream(
    container: av.container.InputContainer, stream: av.AudioStream, name: str, duration: float | None
) -> npt.NDArray[np.float32]:
    buffer = _SampleBuffer(int((duration or 0) * SAMPLE_RATE) + SAMPLE_RATE)
    resampler = _Resampler(buffer)
    good = bad = 0
    last_error: av.error.FFmpegError | None = None
    try:
        for packet in container.demux(stream):
            # The last packet is empty: it drains the decoder and is neither good nor bad.
            counted = packet.size > 0
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                if _is_environment_error(exc):
                    raise
                # A corrupt packet loses a few milliseconds; keep going and judge the stream as a whole.
                bad += counted
                last_error = exc
                continue
            good += counted
            for frame in frames:
                resampler.push(frame)
    except av.error.FFmpegError as exc:
        if _is_environment_error(exc):
            raise
        # The demuxer gave up (damaged container): keep what was decoded; the truncation check judges it.
        last_error = exc
    resampler.flush()

    if bad and bad > MAX_BAD_PACKET_FRACTION * (good + bad):
        raise DecodeError(
            f"{name} is mostly undecodable: {bad} of {good + bad} packets failed "
            f"(ffmpeg says {_ffmpeg_says(last_error) if last_error else 'nothing'!r}); "
            "the file is damaged, send an intact copy"
        )
    if good == 0 and last_error is not None:
        raise DecodeError(
            f"cannot decode the audio in {name}: ffmpeg says {_ffmpeg_says(last_error)!r}; "
            "the file is damaged, send an intact copy"
        )

    samples = buffer.result()
    # Float sources (and lossy decoders' overshoot) can exceed full scale; whisper expects [-1, 1].
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples
