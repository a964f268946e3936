"""Convert a CTranslate2 Whisper model directory (the faster-whisper format) into a whisper.cpp ggml file.

The input is what ``ct2-transformers-converter`` writes for a Whisper model: ``model.bin`` (binary version 6),
``config.json`` and the vocabulary (``vocabulary.txt``, ``vocabulary.json`` or, failing both, ``tokenizer.json``).
``model.bin`` may also come split into ``model.bin.part1``, ``model.bin.part2``, ...; the parts are read as one
stream, never joined on disk.

The output follows whisper.cpp's ``convert-pt-to-ggml.py``: header, mel filter bank, the regular tokens of the
vocabulary, then every tensor whisper.cpp's loader expects (it refuses files with missing or unknown tensors).
Weights are stored as float16; 1-D tensors, conv biases and positional embeddings as float32, because that is
the type whisper.cpp allocates for them and its loader compares byte sizes.

The converter works one variable at a time: it first reads the index of ``model.bin`` (names, shapes, offsets),
then seeks to each variable it needs, so memory use stays near the size of the largest single tensor.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec
import numpy as np

from .errors import ModelFormatError

log = logging.getLogger(__name__)

__all__ = ["ModelHeader", "convert_ct2_to_ggml", "find_model_parts", "mel_filters", "read_header"]

#: The only CTranslate2 binary format this converter reads (CTranslate2 >= 3 writes it).
CT2_BINARY_VERSION = 6
#: ``ggml`` as a little-endian int32: the first four bytes of every whisper.cpp model file.
GGML_MAGIC = 0x67676D6C
#: ggml's file type for "mostly float16".
GGML_FTYPE_F16 = 1

SAMPLE_RATE = 16000
N_FFT = 400
EOT_TOKEN = "<|endoftext|>"

#: n_vocab of the English-only models; multilingual ones have 51865 (51866 from large-v3 on).
N_VOCAB_ENGLISH = 51864

# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
_CT2_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # no numpy bfloat16: kept as raw 16-bit words, widened on load
}

# whisper.cpp tells model sizes apart by the number of encoder layers only.
_SIZES: dict[int, str] = {4: "tiny", 6: "base", 12: "small", 24: "medium", 32: "large"}


class ModelHeader(msgspec.Struct, frozen=True):
    """The hyperparameters of a whisper.cpp model, as written in the ggml header."""

    n_vocab: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    n_mels: int
    ftype: int = GGML_FTYPE_F16

    @property
    def multilingual(self) -> bool:
        """English-only models have exactly 51864 tokens; everything larger is multilingual."""
        return self.n_vocab > N_VOCAB_ENGLISH

    @property
    def family(self) -> str | None:
        """The official model name these shapes belong to (``tiny.en``, ``base``, ``large-v3-turbo``, ...).

        None when the encoder depth matches no Whisper size. ``large-v1`` and ``large-v2`` share every shape
        and are both called ``large``; a decoder shallower than the encoder (distil-whisper) adds ``-distil``.
        """
        size = _SIZES.get(self.n_audio_layer)
        if size is None:
            return None
        if size == "large":
            if self.n_vocab == 51866:
                return "large-v3-turbo" if self.n_text_layer == 4 else "large-v3"
            name = "large"
        else:
            name = size if self.multilingual else f"{size}.en"
        if self.n_text_layer < self.n_audio_layer:
            name += "-distil"
        return name


def read_header(path: Path) -> ModelHeader:
    """Read the hyperparameters of a ggml model file (raises ModelFormatError if it is not one)."""
    with open(path, "rb") as f:
        raw = f.read(4 * 12)
    if len(raw) < 48:
        raise ModelFormatError(f"{path}: too short to be a whisper.cpp ggml model")
    magic, *fields = struct.unpack("<I11i", raw)
    if magic != GGML_MAGIC:
        raise ModelFormatError(f"{path}: not a whisper.cpp ggml model (bad magic {magic:#x})")
    return ModelHeader(*fields)


# --------------------------------------------------------------------------------------------------------------
# Reading model.bin


class _ConcatReader(io.RawIOBase):
    """Several files read as one seekable stream, so a split ``model.bin`` needs no joined copy on disk."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._files: list[BinaryIO] = []
        self._starts: list[int] = []
        self._size = 0
        try:
            for path in paths:
                f = open(path, "rb")
                self._files.append(f)
                self._starts.append(self._size)
                self._size += os.fstat(f.fileno()).st_size
        except BaseException:
            self.close()
            raise
        self._pos = 0

    @property
    def size(self) -> int:
        """Total length of all parts."""
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            # The last part that starts at or before the current position holds it.
            i = max(j for j, start in enumerate(self._starts) if start <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:])  # type: ignore[attr-defined]
            if not n:
                break
            done += n
            self._pos += n
        return done

    def read_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes or raise ModelFormatError (a truncated file or a missing part)."""
        data = self.read(n)
        if data is None or len(data) != n:
            raise ModelFormatError("model.bin is truncated (incomplete download, or a missing model.bin.partN?)")
        return data

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        super().close()


class _Variable(NamedTuple):
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


class _Ct2Model:
    """The variable index of a CTranslate2 ``model.bin`` and on-demand loading of single variables."""

    def __init__(self, reader: _ConcatReader) -> None:
        self._r = reader
        self.spec = ""
        self.variables: dict[str, _Variable] = {}
        self.aliases: dict[str, str] = {}
        self._read_index()

    def _u(self, fmt: str) -> int:
        size = struct.calcsize("<" + fmt)
        return int(struct.unpack("<" + fmt, self._r.read_exact(size))[0])

    def _string(self) -> str:
        raw = self._r.read_exact(self._u("H"))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError("model.bin holds a name that is not UTF-8: not a CTranslate2 model") from None

    def _read_index(self) -> None:
        version = self._u("I")
        if version != CT2_BINARY_VERSION:
            raise ModelFormatError(
                f"model.bin has binary version {version}, expected {CT2_BINARY_VERSION} "
                "(not a CTranslate2 model, or one from an old CTranslate2: convert it again with ctranslate2>=3)"
            )
        self.spec = self._string()
        if self.spec != "WhisperSpec":
            raise ModelFormatError(f"model.bin holds a {self.spec or 'nameless'} model, not a Whisper one")
        self._u("I")  # spec revision: the layout below has not changed across revisions
        count = self._u("I")
        for _ in range(count):
            name = self._string()
            rank = self._u("B")
            shape = tuple(self._u("I") for _ in range(rank))
            dtype = _CT2_DTYPES.get(self._u("B"))
            nbytes = self._u("I")
            if dtype is None:
                raise ModelFormatError(f"model.bin: variable {name} has an unknown data type")
            if nbytes != int(np.prod(shape, dtype=np.int64)) * _NUMPY_DTYPES[dtype].itemsize:
                raise ModelFormatError(f"model.bin: variable {name} has {nbytes} bytes for shape {shape} {dtype}")
            offset = self._r.tell()
            if offset + nbytes > self._r.size:
                self._r.read_exact(self._r.size)  # raises the "truncated" error
            self.variables[name] = _Variable(shape, dtype, offset, nbytes)
            self._r.seek(nbytes, io.SEEK_CUR)
        for _ in range(self._u("I")):
            alias = self._string()
            self.aliases[alias] = self._string()

    def _resolve(self, name: str) -> _Variable:
        # CTranslate2 replaces any variable identical to an earlier one by an alias, not only the tied projection.
        seen = 0
        while name in self.aliases and seen < 8:
            name, seen = self.aliases[name], seen + 1
        try:
            return self.variables[name]
        except KeyError:
            raise ModelFormatError(f"model.bin lacks the tensor {name}: not a complete Whisper model") from None

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a variable, without reading its data."""
        return self._resolve(name).shape

    def scalar(self, name: str) -> int | None:
        """An integer scalar (such as ``encoder/num_heads``), or None when the model does not have it."""
        if name not in self:
            return None
        return int(self.load(name).reshape(-1)[0])

    def load(self, name: str) -> np.ndarray:
        """One variable as an array: floats stay float16/float32, quantized weights come back dequantized."""
        var = self._resolve(name)
        self._r.seek(var.offset)
        array = np.frombuffer(self._r.read_exact(var.nbytes), dtype=_NUMPY_DTYPES[var.dtype]).reshape(var.shape)
        if var.dtype == "bfloat16":
            # bfloat16 is the upper half of a float32.
            return (array.astype(np.uint32) << 16).view(np.float32)
        scale_name = f"{name}_scale"
        if var.dtype in ("int8", "int16") and scale_name in self:
            # CTranslate2 stores round(w * scale), with one scale per output row (int8) or per tensor (int16).
            scale = self.load(scale_name).astype(np.float32)
            scale = scale.reshape((-1,) + (1,) * (array.ndim - 1)) if scale.ndim else scale
            return array.astype(np.float32) / scale
        return array


def find_model_parts(src_dir: Path) -> list[Path]:
    """The file(s) holding ``model.bin`` in a directory: ``model.bin``, else ``model.bin.part1``, ``.part2``, ...

    Raises ModelFormatError when there is neither, or when the numbering has a gap.
    """
    whole = src_dir / "model.bin"
    if whole.is_file():
        return [whole]
    numbered: dict[int, Path] = {}
    for path in src_dir.glob("model.bin.part*"):
        m = re.fullmatch(r"model\.bin\.part(\d+)", path.name)
        if m and path.is_file():
            numbered[int(m.group(1))] = path
    if not numbered:
        raise ModelFormatError(f"{src_dir} has no model.bin: not a CTranslate2 model directory")
    expected = list(range(1, len(numbered) + 1))
    if sorted(numbered) != expected:
        raise ModelFormatError(f"{src_dir}: model.bin parts {sorted(numbered)} are not numbered 1..{len(numbered)}")
    return [numbered[i] for i in expected]


# --------------------------------------------------------------------------------------------------------------
# Mel filters and vocabulary


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False).
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mels = f / f_sp
    log_region = f >= min_log_hz
    mels[log_region] = min_log_mel + np.log(f[log_region] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    freqs = f_sp * mels
    log_region = mels >= min_log_mel
    freqs[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return freqs


@lru_cache(maxsize=4)
def mel_filters(n_mels: int, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)`` (Slaney scale and norm) in plain numpy.

    This is the filter bank OpenAI ships in ``mel_filters.npz`` and whisper.cpp reads from the model file.
    Returns float32 of shape ``(n_mels, 1 + n_fft // 2)``; do not modify it (it is cached).
    """
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sr / 2.0]))[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    # Slaney normalisation: each triangle has unit area in Hz.
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: byte-level BPE writes each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _read_tokens(src_dir: Path) -> list[str]:
    """All tokens in id order, from whichever vocabulary file the directory has."""
    txt, js, tok = src_dir / "vocabulary.txt", src_dir / "vocabulary.json", src_dir / "tokenizer.json"
    try:
        if txt.is_file():
            # Split on "\n" only: str.splitlines() would also split inside tokens, and the multilingual vocabulary
            # has an empty token (id 50256) that must keep its line.
            text = txt.read_text(encoding="utf-8")
            tokens = text.split("\n")
            if text.endswith("\n"):
                tokens.pop()
            return tokens
        if js.is_file():
            tokens = json.loads(js.read_bytes())
            if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
                return tokens
            raise ModelFormatError(f"{js} is not a JSON list of tokens")
        if tok.is_file():
            data = json.loads(tok.read_bytes())
            by_id = {int(i): str(t) for t, i in data["model"]["vocab"].items()}
            by_id.update({int(t["id"]): str(t["content"]) for t in data.get("added_tokens", [])})
            return [by_id.get(i, "") for i in range(max(by_id) + 1)]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{src_dir}: unreadable vocabulary ({e})") from e
    raise ModelFormatError(f"{src_dir} has no vocabulary.txt, vocabulary.json or tokenizer.json")


def _regular_tokens(src_dir: Path, n_vocab: int) -> list[bytes]:
    """The byte strings of the tokens below ``<|endoftext|>``: what whisper.cpp reads as its vocabulary.

    whisper.cpp numbers the special tokens itself from ``<|endoftext|>`` = 50256 (English-only) or 50257
    (multilingual), so a vocabulary whose end-of-text token sits elsewhere would decode to garbage.
    """
    tokens = _read_tokens(src_dir)
    if EOT_TOKEN not in tokens:
        raise ModelFormatError(f"{src_dir}: the vocabulary has no {EOT_TOKEN} token: not a Whisper vocabulary")
    eot = tokens.index(EOT_TOKEN)
    expected_eot = 50256 if n_vocab <= N_VOCAB_ENGLISH else 50257
    if eot != expected_eot:
        raise ModelFormatError(
            f"{src_dir}: {EOT_TOKEN} has id {eot}, whisper.cpp expects {expected_eot} for a model of {n_vocab} tokens"
        )
    decoder = _byte_decoder()
    # A character outside the byte alphabet cannot come from byte-level BPE; keep it as UTF-8 rather than fail.
    return [b"".join(bytes([decoder[c]]) if c in decoder else c.encode("utf-8") for c in t) for t in tokens[:eot]]


# --------------------------------------------------------------------------------------------------------------
# Conversion


def _layer_count(model: _Ct2Model, side: str) -> int:
    indices = {int(m.group(1)) for n in model.variables if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if not indices:
        raise ModelFormatError(f"model.bin has no {side} layers: not a Whisper model")
    if indices != set(range(len(indices))):
        raise ModelFormatError(f"model.bin: {side} layers are not numbered 0..{len(indices) - 1}")
    return len(indices)


def _header(model: _Ct2Model) -> ModelHeader:
    n_vocab, n_text_state = model.shape("decoder/embeddings/weight")
    n_audio_state, n_mels, _ = model.shape("encoder/conv1/weight")
    n_audio_ctx = model.shape("encoder/position_encodings/encodings")[0]
    n_text_ctx = model.shape("decoder/position_encodings/encodings")[0]
    if n_audio_state != n_text_state:
        # whisper.cpp asserts this; better to refuse the model here with a message.
        raise ModelFormatError(f"encoder width {n_audio_state} differs from decoder width {n_text_state}")
    # The spec stores head counts; fall back to Whisper's fixed head width of 64.
    n_audio_head = model.scalar("encoder/num_heads") or n_audio_state // 64
    n_text_head = model.scalar("decoder/num_heads") or n_text_state // 64
    return ModelHeader(
        n_vocab=n_vocab,
        n_audio_ctx=n_audio_ctx,
        n_audio_state=n_audio_state,
        n_audio_head=n_audio_head,
        n_audio_layer=_layer_count(model, "encoder"),
        n_text_ctx=n_text_ctx,
        n_text_state=n_text_state,
        n_text_head=n_text_head,
        n_text_layer=_layer_count(model, "decoder"),
        n_mels=n_mels,
    )


def _split_rows(array: np.ndarray, parts: int, index: int) -> np.ndarray:
    if array.shape[0] % parts:
        raise ModelFormatError(f"fused projection of {array.shape[0]} rows cannot be split in {parts}")
    n = array.shape[0] // parts
    return array[index * n : (index + 1) * n]


def _tensors(model: _Ct2Model, header: ModelHeader) -> Iterator[tuple[str, np.ndarray, bool]]:
    """Every tensor whisper.cpp expects as ``(ggml name, array, store as float32)``, one loaded at a time."""

    def norm(ct2: str, ggml: str) -> Iterator[tuple[str, np.ndarray, bool]]:
        yield f"{ggml}.weight", model.load(f"{ct2}/gamma"), True
        yield f"{ggml}.bias", model.load(f"{ct2}/beta"), True

    def linear(ct2: str, ggml: str) -> Iterator[tuple[str, np.ndarray, bool]]:
        yield f"{ggml}.weight", model.load(f"{ct2}/weight"), False
        yield f"{ggml}.bias", model.load(f"{ct2}/bias"), True

    def fused(ct2: str, ggml: Sequence[str]) -> Iterator[tuple[str, np.ndarray, bool]]:
        # CTranslate2 fuses q,k,v (self attention) or k,v (cross attention) along the output dimension.
        # whisper.cpp's key projection has no bias: a key bias adds the same q.b to every attention logit of a
        # query, which softmax cancels, so dropping it is exact (CTranslate2 stores zeros there anyway).
        weight = model.load(f"{ct2}/weight")
        for i, name in enumerate(ggml):
            yield f"{name}.weight", _split_rows(weight, len(ggml), i), False
        del weight
        bias = model.load(f"{ct2}/bias")
        for i, name in enumerate(ggml):
            if not name.endswith(".key"):
                yield f"{name}.bias", _split_rows(bias, len(ggml), i), True

    def block(ct2: str, ggml: str, cross: bool) -> Iterator[tuple[str, np.ndarray, bool]]:
        yield from norm(f"{ct2}/self_attention/layer_norm", f"{ggml}.attn_ln")
        qkv = [f"{ggml}.attn.query", f"{ggml}.attn.key", f"{ggml}.attn.value"]
        yield from fused(f"{ct2}/self_attention/linear_0", qkv)
        yield from linear(f"{ct2}/self_attention/linear_1", f"{ggml}.attn.out")
        if cross:
            yield from norm(f"{ct2}/attention/layer_norm", f"{ggml}.cross_attn_ln")
            yield from linear(f"{ct2}/attention/linear_0", f"{ggml}.cross_attn.query")
            yield from fused(f"{ct2}/attention/linear_1", [f"{ggml}.cross_attn.key", f"{ggml}.cross_attn.value"])
            yield from linear(f"{ct2}/attention/linear_2", f"{ggml}.cross_attn.out")
        yield from norm(f"{ct2}/ffn/layer_norm", f"{ggml}.mlp_ln")
        yield from linear(f"{ct2}/ffn/linear_0", f"{ggml}.mlp.0")
        yield from linear(f"{ct2}/ffn/linear_1", f"{ggml}.mlp.2")

    yield "encoder.positional_embedding", model.load("encoder/position_encodings/encodings"), True
    for conv in ("conv1", "conv2"):
        yield f"encoder.{conv}.weight", model.load(f"encoder/{conv}/weight"), False
        # whisper.cpp adds the bias to a [time, channels] result, so it wants it as [n, 1].
        yield f"encoder.{conv}.bias", model.load(f"encoder/{conv}/bias").reshape(-1, 1), True
    for i in range(header.n_audio_layer):
        yield from block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    yield from norm("encoder/layer_norm", "encoder.ln_post")

    yield "decoder.positional_embedding", model.load("decoder/position_encodings/encodings"), True
    yield "decoder.token_embedding.weight", model.load("decoder/embeddings/weight"), False
    for i in range(header.n_text_layer):
        yield from block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    yield from norm("decoder/layer_norm", "decoder.ln")


def _write_tensor(out: BinaryIO, name: str, array: np.ndarray, as_f32: bool) -> None:
    # 1-D tensors are float32 in whisper.cpp whatever the file type.
    as_f32 = as_f32 or array.ndim < 2
    data = np.ascontiguousarray(array, dtype=np.float32 if as_f32 else np.float16)
    encoded = name.encode("utf-8")
    out.write(struct.pack("<iii", data.ndim, len(encoded), 0 if as_f32 else 1))
    # ggml lists dimensions fastest-varying first: the reverse of numpy's order.
    out.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
    out.write(encoded)
    out.write(data.data)


def convert_ct2_to_ggml(src_dir: Path, dest_file: Path, *, model_parts: Sequence[Path] | None = None) -> ModelHeader:
    """Convert the CTranslate2 Whisper model in ``src_dir`` into the whisper.cpp ggml file ``dest_file``.

    ``model_parts`` names the files that make up ``model.bin`` when they do not all sit in ``src_dir`` (a model
    split across packages); by default ``src_dir/model.bin`` or ``src_dir/model.bin.part1``, ``.part2``, ...
    The hyperparameters come from the tensor shapes. ``dest_file`` appears atomically (a temporary file in the
    same directory, then a rename), so a reader never sees half a model. Raises ModelFormatError when the
    input is not a complete CTranslate2 Whisper model.
    """
    src_dir, dest_file = Path(src_dir), Path(dest_file)
    if not src_dir.is_dir():
        raise ModelFormatError(f"{src_dir} is not a directory (expected a CTranslate2 model directory)")
    parts = [Path(p) for p in model_parts] if model_parts else find_model_parts(src_dir)
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelFormatError(f"model.bin part(s) not found: {', '.join(missing)}")

    started = time.monotonic()
    with _ConcatReader(parts) as reader:
        model = _Ct2Model(reader)
        header = _header(model)
        tokens = _regular_tokens(src_dir, header.n_vocab)
        filters = mel_filters(header.n_mels)

        dest_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest_file.name}.", suffix=".tmp", dir=dest_file.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                out.write(struct.pack("<I", GGML_MAGIC))
                out.write(struct.pack("<11i", *msgspec.structs.astuple(header)))
                out.write(struct.pack("<ii", *filters.shape))
                out.write(filters.astype("<f4").tobytes())
                out.write(struct.pack("<i", len(tokens)))
                for token in tokens:
                    out.write(struct.pack("<i", len(token)))
                    out.write(token)
                for name, array, as_f32 in _tensors(model, header):
                    _write_tensor(out, name, array, as_f32)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; models are shared with the pool processes
            os.replace(tmp, dest_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    log.info(
        "converted %s to %s (%s) in %.1fs", src_dir, dest_file, header.family or "unknown size",
        time.monotonic() - started,
    )
    return header
