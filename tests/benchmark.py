"""The benchmark behind ``bench.sh``: the node against the bare engine, the file cache against the object store,
and two nodes against one. Every figure is a ratio of two things measured in the same run on this machine.

Sections (``--sections``, default all, in this order):

**engine** (DESIGN.md, "Performance targets"):

1. **Bare engine**: pywhispercpp in a plain loop over the batch, with every core as inference threads and the
   node's decoding parameters; each file is decoded with ``transcoder.decode.decode`` first, so both sides pay
   for decoding. The model is loaded before the clock starts.
2. **Node**: ``v2t-node start`` as a subprocess (fresh data directory, so a fresh embedded Redis and an empty
   result cache; a free loopback port), once per pool configuration. The clock starts at the first upload after
   ``/v1/health`` is ok and stops at the last job's ``finished_at``. Every job must complete.
3. **Ratio** = node throughput / bare throughput (> 1: the node is faster). Each node run is compared with the
   mean of the bare runs just before and after it (bare, nodes..., bare, nodes..., bare), so drift shows.
4. **Submission latency**: ``POST /v1/jobs`` of one small file the node has already transcribed (a result cache
   hit), paced open-loop at a fixed rate, on a node left idle after its batch.

**cache** (``tests/bench_cache.py``): a 50 MiB object leased from a warm LRU file cache (and read through)
against the same object fetched from S3 (moto's server) into a cold one; ratio = fetch time / hit time.

**scaling** (``tests/bench_scaling.py``): the batch through two nodes pinned to a core each (1 process x 1
thread, one shared valkey and objects directory) against one such node, interleaved; ratio = 2-node throughput
/ 1-node throughput (ideal 2.0), with how the jobs split between the nodes.

The audio (espeak-ng speech, sox-concatenated to 5-60 s, as WAV, MP3 and M4A) and the tiny.en ggml are made once
into ``~/.cache/v2t-node-bench`` (``$XDG_CACHE_HOME`` honoured), keyed by a hash of what shapes them. Everything
talks to 127.0.0.1 only; nodes and servers are stopped (SIGTERM, then SIGKILL to their process group) and their
directories removed even when the run fails or is interrupted (``tests/bench_node.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from tests import bench_cache, bench_scaling
from tests.bench_cache import CacheResult
from tests.bench_node import form, run_batch, running_node, upload, wait_done
from tests.bench_scaling import ScalingReport
from transcoder.decode import SAMPLE_RATE, decode
from transcoder.engine import BASE_PARAMS
from transcoder.pool import PoolSettings
from transcoder.registry import DEFAULT_MODEL, ModelRegistry

# -- the audio ---------------------------------------------------------------------------------------------------

#: Bump to regenerate the cached audio when the generator changes in a way the cache key does not see.
GENERATOR_VERSION = 1

SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please remember to bring an umbrella because the sky looks very cloudy this afternoon.",
    "She walked to the library on a quiet morning to return her old books.",
    "My neighbour grows fresh tomatoes and green beans in his small garden.",
    "The meeting was moved to the large conference room on the third floor.",
    "A warm cup of tea is the best way to start a cold winter morning.",
    "The train to the coast leaves early, so we packed our bags last night.",
    "Our team finished the project a week ahead of the original schedule.",
    "The children built a sand castle with towers, walls and a deep moat.",
    "Heavy rain flooded the road, and the bus had to take a long detour.",
    "He forgot his keys at the office and had to wait for his sister.",
    "The museum opened a new exhibition about ancient ships and sailors.",
    "Fresh bread from the bakery on the corner smells wonderful every morning.",
    "The pilot announced that the plane would land twenty minutes early.",
    "Please send the final report to everyone before the end of the day.",
    "The old clock in the hallway stopped working during the storm.",
    "Our cat sleeps on the sunny window sill for most of the afternoon.",
    "The orchestra played a beautiful piece that nobody in the hall had heard before.",
    "We need to buy milk, eggs, flour and butter for the birthday cake.",
    "The engineer explained how the new bridge can carry much heavier traffic.",
    "After dinner the family went for a long walk along the quiet beach.",
    "The software update fixed several problems with the printer and the network.",
    "A small boat drifted slowly across the calm blue water of the lake.",
    "The teacher asked the students to write a short story about their holidays.",
)

#: espeak-ng voices (with variants) and speaking rates, rotated over the files.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-gb-x-rp+m3", "en-029", "en-gb+f2")
RATES = (150, 165, 175, 140, 160)

#: Output formats, rotated over the files: (suffix, ffmpeg output arguments). Compressed files at other rates and
#: layouts make decoding cost something, as real uploads do.
FORMATS: dict[str, list[str]] = {
    "wav": ["-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le"],
    "mp3": ["-ar", "44100", "-ac", "2", "-c:a", "libmp3lame", "-b:a", "96k"],
    "m4a": ["-ar", "48000", "-ac", "1", "-c:a", "aac", "-b:a", "64k"],
}

#: File lengths in seconds. Whisper works in 30 s windows, so the mix of short and long files matters.
FULL_LENGTHS = (60, 8, 45, 15, 30, 5, 52, 20, 38, 12, 25, 40)  # 350 s
QUICK_LENGTHS = (5, 28, 9, 20, 14, 24, 7, 16)  # 123 s

#: The small file the latency test submits over and over (a cache hit after its first transcription).
LATENCY_CLIP = "latency.mp3"


@dataclass(frozen=True)
class AudioFile:
    """One benchmark input."""

    path: Path
    seconds: float
    format: str


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "v2t-node-bench"


def _run(args: Sequence[str]) -> str:
    """Runs a generator tool; raises with its stderr when it fails."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError(f"{args[0]} is not installed; the benchmark needs espeak-ng, sox and ffmpeg") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _tool_versions() -> list[str]:
    return [
        _run(["espeak-ng", "--version"]).strip(),
        _run(["sox", "--version"]).strip(),
        _run(["ffmpeg", "-version"]).splitlines()[0],
    ]


def corpus_key(lengths: Sequence[int]) -> str:
    """A hash of everything that shapes the generated audio."""
    spec = {
        "version": GENERATOR_VERSION, "lengths": list(lengths), "sentences": SENTENCES, "voices": VOICES,
        "rates": RATES, "formats": FORMATS, "tools": _tool_versions(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def corpus(lengths: Sequence[int]) -> tuple[list[AudioFile], AudioFile]:
    """The batch and the latency clip, generated once into the cache (renamed into place when complete)."""
    target = cache_root() / f"audio-{corpus_key(lengths)}"
    if not (target / "manifest.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".audio-", dir=target.parent))
        try:
            t0 = time.monotonic()
            _generate(staging, lengths)
            staging.rename(target)
            print(f"generated {len(lengths)} audio files in {time.monotonic() - t0:.1f}s into {target}", flush=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    manifest = json.loads((target / "manifest.json").read_text())
    files = [AudioFile(target / m["name"], m["seconds"], m["format"]) for m in manifest["files"]]
    clip = manifest["latency"]
    return files, AudioFile(target / clip["name"], clip["seconds"], clip["format"])


def _generate(out: Path, lengths: Sequence[int]) -> None:
    """Writes the batch, the latency clip and ``manifest.json`` into ``out``."""
    clips = out / "clips"
    clips.mkdir()
    entries = []
    formats = list(FORMATS)
    for i, seconds in enumerate(lengths):
        fmt = formats[i % len(formats)]
        wav = _spoken(clips, i, seconds)
        dest = out / f"speech-{i:02d}-{seconds}s.{fmt}"
        _encode(wav, dest, fmt)
        entries.append({"name": dest.name, "seconds": len(decode(dest)) / SAMPLE_RATE, "format": fmt})
    clip_wav = clips / "latency.wav"
    _speak(SENTENCES[0], VOICES[0], RATES[0], clip_wav)
    _encode(clip_wav, out / LATENCY_CLIP, "mp3")
    latency = {"name": LATENCY_CLIP, "seconds": len(decode(out / LATENCY_CLIP)) / SAMPLE_RATE, "format": "mp3"}
    shutil.rmtree(clips)
    (out / "manifest.json").write_text(json.dumps({"files": entries, "latency": latency}, indent=1))


def _spoken(clips: Path, index: int, seconds: int) -> Path:
    """``seconds`` of speech: sentences in one voice, concatenated by sox and cut to length, 16 kHz mono."""
    voice, rate = VOICES[index % len(VOICES)], RATES[index % len(RATES)]
    parts: list[Path] = []
    total = 0.0
    while total < seconds:
        # A different run of sentences per file, so no two files share their words in the same order.
        sentence = SENTENCES[(index * 5 + len(parts)) % len(SENTENCES)]
        part = clips / f"{index:02d}-{len(parts):02d}.wav"
        _speak(sentence, voice, rate, part)
        total += _wav_seconds(part)
        parts.append(part)
    dest = clips / f"{index:02d}.wav"
    _run(["sox", *map(str, parts), "-r", "16000", "-c", "1", "-b", "16", str(dest), "trim", "0", str(seconds)])
    return dest


def _speak(text: str, voice: str, rate: int, dest: Path) -> None:
    _run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(dest), text])


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def _encode(wav: Path, dest: Path, fmt: str) -> None:
    _run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav), *FORMATS[fmt],
          str(dest)])


def model_path(name: str = DEFAULT_MODEL) -> tuple[Path, Path]:
    """(models directory, ggml file): converted once from the bundled copy, shared by the node and the bare runs."""
    models_dir = cache_root() / "models"
    return models_dir, ModelRegistry(models_dir).path(name)


# -- the bare engine ---------------------------------------------------------------------------------------------

class BareEngine:
    """pywhispercpp in a plain loop: the baseline. The model is loaded once, outside the timed part."""

    def __init__(self, ggml: Path, threads: int) -> None:
        self.ggml = ggml
        self.threads = threads
        self._model: Any = None

    def load(self) -> None:
        from pywhispercpp.model import Model

        if self._model is None:
            self._model = Model(str(self.ggml), redirect_whispercpp_logs_to=None, n_threads=self.threads,
                                **BASE_PARAMS)

    def run(self, files: Sequence[AudioFile]) -> float:
        """Decodes and transcribes every file in turn; returns the wall seconds."""
        self.load()
        t0 = time.perf_counter()
        for f in files:
            segments = self._model.transcribe(decode(f.path), language="en", n_threads=self.threads)
            if not any(s.text.strip() for s in segments):
                raise RuntimeError(f"the bare engine heard nothing in {f.path.name}")
        return time.perf_counter() - t0


# -- the node ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolConfig:
    """A pool configuration to run the node with; ``processes == 0`` means the node's own defaults."""

    processes: int
    threads: int
    default: bool = False

    @property
    def resolved(self) -> tuple[int, int]:
        """(processes, threads) as the node will size its pool on this machine."""
        return PoolSettings(processes=self.processes, threads=self.threads).sizes()

    @property
    def label(self) -> str:
        p, t = self.resolved
        return f"default ({p}x{t})" if self.default else f"{p}x{t}"

    def flags(self) -> list[str]:
        return [] if self.default else ["--processes", str(self.processes), "--threads", str(self.threads)]


def parse_configs(spec: str) -> list[PoolConfig]:
    """``default,1x2,2x1`` → configurations, dropping those that size the pool the same as an earlier one."""
    configs: list[PoolConfig] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item == "default":
            config = PoolConfig(0, 0, default=True)
        else:
            p, sep, t = item.partition("x")
            if not sep or not p.isdigit() or not t.isdigit() or int(p) < 1 or int(t) < 1:
                raise ValueError(f"bad pool configuration {item!r}: use PROCESSESxTHREADS (e.g. 2x1) or default")
            config = PoolConfig(int(p), int(t))
        if all(c.resolved != config.resolved for c in configs):
            configs.append(config)
    if not configs:
        raise ValueError("no pool configuration to run")
    return configs


# -- the node's side: submission latency -------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyResult:
    """Submission latency, client-side, in milliseconds."""

    requests: int
    rate: float
    """Requests per second actually offered."""
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def measure_latency(url: str, clip: AudioFile, count: int, rate: float) -> LatencyResult:
    """``count`` submissions of ``clip`` paced at ``rate`` per second (open loop), once it is in the result cache.

    The latency of one request is measured from just before it is sent to its response body read, so it includes
    this client's own overhead on the same cores.
    """
    data = clip.path.read_bytes()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        first = await upload(session, url, clip.path.name, data)
        await wait_done(session, url, {first["id"]}, time.time() + 120)
        latencies: list[float] = []
        errors = 0

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/jobs", data=form(clip.path.name, data)) as resp:
                    await resp.read()
                    ok = resp.status in (200, 202)
            except aiohttp.ClientError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

        tasks = []
        t0 = time.perf_counter()
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        offered = (count - 1) / max(time.perf_counter() - t0, 1e-9) if count > 1 else rate
        await asyncio.gather(*tasks)
    ms = [x * 1000 for x in latencies]
    return LatencyResult(count, offered, percentile(ms, 50), percentile(ms, 99), max(ms), errors)


# -- the schedule and the report -----------------------------------------------------------------------------------

@dataclass
class Run:
    """One timed pass over the batch: the bare engine's or a node's."""

    round: int
    label: str
    wall: float
    audio: float
    uploads: float | None = None
    ratio: float | None = None

    @property
    def throughput(self) -> float:
        return self.audio / self.wall


@dataclass
class Report:
    """Everything one benchmark run measured (``--json`` writes it as it is)."""

    cores: int
    files: int
    audio: float
    formats: dict[str, int]
    bare_label: str
    runs: list[Run] = field(default_factory=list)
    latency: LatencyResult | None = None
    other_cores: float | None = None
    """Cores that processes other than the benchmark's used, on average over the run (noise)."""
    best: str = ""
    best_ratio: float = 0.0


def print_runs(report: Report) -> None:
    """Every run in the order it ran."""
    print(f"{'round':>5}  {'run':<18} {'wall s':>8} {'upload s':>8} {'audio s/s':>10} {'node/bare':>9}")
    for run in report.runs:
        ratio = f"{run.ratio:9.2f}" if run.ratio is not None else f"{'-':>9}"
        uploads = f"{run.uploads:8.2f}" if run.uploads is not None else f"{'-':>8}"
        print(f"{run.round:>5}  {run.label:<18} {run.wall:8.2f} {uploads} {run.throughput:10.1f} {ratio}")


def _bracketing_ratios(report: Report) -> None:
    """Each node run against the mean of the bare runs that open and close its round."""
    bare = {r.round: r for r in report.runs if r.label == report.bare_label}
    for run in report.runs:
        if run.label == report.bare_label:
            continue
        refs = [bare[k].throughput for k in (run.round, run.round + 1) if k in bare]
        run.ratio = run.throughput / statistics.fmean(refs)


@dataclass(frozen=True)
class Summary:
    """One configuration over all its runs."""

    label: str
    runs: int
    mean_wall: float
    best_wall: float
    mean_ratio: float
    """Mean of the runs' ratios against their bracketing bare runs."""
    spread: tuple[float, float]
    best_ratio: float
    """The bare engine's fastest run over this configuration's fastest: the least disturbed comparison."""


def summarize(report: Report, label: str) -> Summary:
    runs = [r for r in report.runs if r.label == label]
    bare_best = min(r.wall for r in report.runs if r.label == report.bare_label)
    ratios = [r.ratio if r.ratio is not None else 1.0 for r in runs]
    best = min(r.wall for r in runs)
    return Summary(label, len(runs), statistics.fmean(r.wall for r in runs), best, statistics.fmean(ratios),
                   (min(ratios), max(ratios)), bare_best / best)


def bare_noise(report: Report) -> float:
    """How far the two fastest bare runs differ, relatively: what a difference must beat to mean something."""
    walls = sorted(r.wall for r in report.runs if r.label == report.bare_label)
    return walls[1] / walls[0] - 1 if len(walls) > 1 else 0.0


def print_summary(report: Report, configs: Sequence[PoolConfig]) -> None:
    """Each configuration's mean and best, and the verdicts (the fastest configuration is kept in the report)."""
    print()
    print("summary: ratio = node throughput / bare throughput (> 1: the node is faster); mean = mean of the runs'")
    print("ratios against their bracketing bare runs; best = fastest bare run / fastest run (least disturbed)")
    print(f"{'configuration':<18} {'runs':>4} {'mean s':>8} {'best s':>8} {'best a/s':>9} {'ratio mean':>10} "
          f"{'min..max':>11} {'ratio best':>10}")
    rows = [summarize(report, report.bare_label)] + [summarize(report, c.label) for c in configs]
    for row in rows:
        spread = "" if row.label == report.bare_label else f"{row.spread[0]:.2f}..{row.spread[1]:.2f}"
        print(f"{row.label:<18} {row.runs:>4} {row.mean_wall:8.2f} {row.best_wall:8.2f} "
              f"{report.audio / row.best_wall:9.1f} {row.mean_ratio:10.2f} {spread:>11} {row.best_ratio:10.2f}")
    by_config = dict(zip(configs, rows[1:], strict=True))
    best = max(configs, key=lambda c: by_config[c].best_ratio)
    report.best, report.best_ratio = best.label, by_config[best].best_ratio
    print()
    _print_pool_verdict(report, configs, by_config, best)
    _print_latency(report.latency)
    print_noise(report.other_cores)


def _print_pool_verdict(report: Report, configs: Sequence[PoolConfig], rows: dict[PoolConfig, Summary],
                        best: PoolConfig) -> None:
    p, t = best.resolved
    target = "met" if rows[best].best_ratio >= 1 else "MISSED"
    print(f"fastest: {best.label}, {rows[best].best_ratio:.2f}x the bare engine's throughput (best runs; mean "
          f"ratio {rows[best].mean_ratio:.2f}); target >= 1: {target}")
    default = next((c for c in configs if c.default), None)
    if default is None:
        return
    if best is default:
        print(f"the current default ({p}x{t} on {report.cores} cores) is the fastest configuration measured")
        return
    gain = rows[best].best_ratio / rows[default].best_ratio - 1
    noise = max(MIN_NOISE, bare_noise(report))
    dp, dt = default.resolved
    if gain > noise:
        print(f"suggested pool defaults on {report.cores} cores: processes={p} threads={t}, "
              f"{gain:+.1%} over the current default ({dp}x{dt})")
    else:
        print(f"no clear winner: {best.label} is {gain:+.1%} over the current default ({dp}x{dt}), within the "
              f"{noise:.0%} that repeated bare runs differ by; keep the default or run more rounds")


def _print_latency(lat: LatencyResult | None) -> None:
    if lat is None:
        return
    verdict = "met" if lat.p99_ms <= 5 and lat.errors == 0 else "MISSED"
    print(f"submission latency (POST /v1/jobs, result cache hits, {lat.requests} requests at {lat.rate:.0f} req/s): "
          f"p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms, max {lat.max_ms:.2f} ms, errors {lat.errors}; "
          f"target p99 <= 5 ms: {verdict}")


# -- noise -----------------------------------------------------------------------------------------------------------

#: Other processes using more than this many cores on average make the run noisy (the warning in the report).
NOISY_CORES = 0.1
#: A configuration must beat another by more than this (or the bare runs' own variation) to count as faster.
MIN_NOISE = 0.02


def print_noise(other_cores: float | None) -> None:
    """The line that says how busy the machine was with other work while a section ran."""
    if other_cores is not None:
        noisy = "  -- the figures are noisy" if other_cores > NOISY_CORES else ""
        print(f"other processes used {other_cores:.2f} of {os.cpu_count() or 1} cores during the section{noisy}")


class CpuMeter:
    """How much CPU processes other than this one and its descendants use (Linux ``/proc/stat``)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(busy seconds of all cores, seconds used by us and our reaped descendants, wall) or None."""
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def other_cores(self) -> float | None:
        """Cores used by others, on average since this meter was made."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, ours, wall = (b - a for a, b in zip(self._start, end, strict=True))
        return max(0.0, (busy - ours) / wall)


# -- main ------------------------------------------------------------------------------------------------------------

#: The sections, in the order they run.
SECTIONS = ("engine", "cache", "scaling")


@dataclass
class Results:
    """Everything one benchmark run measured, by section; None for a section not run (``--json`` writes it)."""

    sections: list[str]
    engine: Report | None = None
    cache: CacheResult | None = None
    scaling: ScalingReport | None = None


def parse_sections(spec: str) -> list[str]:
    """``engine,cache`` → the sections to run, in their fixed order."""
    asked = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = asked - set(SECTIONS)
    if unknown or not asked:
        raise ValueError(f"bad --sections {spec!r}: name one or more of {','.join(SECTIONS)}")
    return [s for s in SECTIONS if s in asked]


def build_parser() -> argparse.ArgumentParser:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="bench.sh", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                   help="a smaller batch, fewer rounds, configurations and repetitions (also BENCH_QUICK=1)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"what to run, comma-separated (default: all of {','.join(SECTIONS)})")
    p.add_argument("--rounds", type=int, help="engine: node runs per configuration; scaling: 2-node runs "
                                              "(default 3, quick 2)")
    p.add_argument("--configs", help=f"engine: pool configurations, PROCESSESxTHREADS or default "
                                     f"(default: default,1x{cores},{cores}x1,1x1; quick: without 1x1)")
    p.add_argument("--latency-requests", type=int, default=400,
                   help="engine: submissions in the latency test (0: skip)")
    p.add_argument("--latency-rate", type=float, default=200.0, help="engine: their rate, per second")
    p.add_argument("--cache-repeats", type=int, help="cache: misses and hits timed (default 5, quick 3)")
    p.add_argument("--cache-mib", type=int, default=bench_cache.DEFAULT_SIZE >> 20,
                   help="cache: size of the object in MiB (default %(default)s)")
    p.add_argument("--timeout", type=float, help="seconds one batch run may take (default 60 + 4 x audio)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a performance target is missed "
                                                         "(engine: node/bare >= 1, latency p99 <= 5 ms)")
    return p


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # run the finally blocks: stop nodes, remove directories
    cores = os.cpu_count() or 1
    try:
        sections = parse_sections(args.sections)
        configs = parse_configs(args.configs or (f"default,1x{cores},{cores}x1" + ("" if args.quick else ",1x1")))
    except ValueError as e:
        print(f"bench.sh: {e}", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 3)
    repeats = args.cache_repeats or (3 if args.quick else 5)
    if rounds < 1 or repeats < 1 or args.cache_mib < 1:
        print("bench.sh: --rounds, --cache-repeats and --cache-mib must be at least 1", file=sys.stderr)
        return 2
    if "scaling" in sections and len(bench_scaling.cores()) < 2:
        print("bench.sh: the scaling section needs two cores; leave it out with --sections", file=sys.stderr)
        return 2
    workdir = Path(os.environ.get("BENCH_WORKDIR") or tempfile.mkdtemp(prefix="v2t-bench-"))
    try:
        results = benchmark(args, sections, configs, rounds, repeats, workdir)
    except KeyboardInterrupt:
        print("\nbench.sh: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"bench.sh: {e}", file=sys.stderr)
        return 1
    finally:
        if not os.environ.get("BENCH_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=1, default=str))
    engine = results.engine
    missed = engine is not None and (engine.best_ratio < 1 or (engine.latency is not None
                                                               and engine.latency.p99_ms > 5))
    return 1 if args.strict and missed else 0


def benchmark(args: argparse.Namespace, sections: Sequence[str], configs: Sequence[PoolConfig], rounds: int,
              repeats: int, workdir: Path) -> Results:
    """Runs the chosen sections in turn, printing each one's report as it ends and the ratios of all at the end."""
    results = Results(list(sections))
    files: list[AudioFile] = []
    clip: AudioFile | None = None
    if "engine" in results.sections or "scaling" in results.sections:
        files, clip = corpus(QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    audio = sum(f.seconds for f in files)
    if "engine" in results.sections and clip is not None:
        results.engine = engine_section(args, configs, rounds, files, clip, workdir)
    if "cache" in results.sections:
        meter = CpuMeter()
        results.cache = bench_cache.run(workdir, repeats, args.cache_mib << 20)
        print()
        bench_cache.print_result(results.cache)
        print_noise(meter.other_cores())
    if "scaling" in results.sections:
        models_dir, _ = model_path()
        timeout = args.timeout or 60 + 4 * audio
        meter = CpuMeter()
        results.scaling = bench_scaling.run([f.path for f in files], audio, models_dir, workdir, rounds, timeout)
        results.scaling.other_cores = meter.other_cores()
        print()
        bench_scaling.print_report(results.scaling)
        print_noise(results.scaling.other_cores)
    print_ratios(results)
    return results


def engine_section(args: argparse.Namespace, configs: Sequence[PoolConfig], rounds: int, files: Sequence[AudioFile],
                   clip: AudioFile, workdir: Path) -> Report:
    """Runs bare, every configuration, bare, ... for ``rounds`` rounds and prints each run as it ends."""
    cores = os.cpu_count() or 1
    models_dir, ggml = model_path()
    audio = sum(f.seconds for f in files)
    formats = {fmt: sum(f.format == fmt for f in files) for fmt in FORMATS}
    bare = BareEngine(ggml, cores)
    bare.load()
    report = Report(cores, len(files), audio, formats, f"bare ({cores} thr)")
    meter = CpuMeter()
    timeout = args.timeout or 60 + 4 * audio
    paths = [f.path for f in files]

    def bare_run(round_no: int) -> None:
        report.runs.append(Run(round_no, report.bare_label, bare.run(files), audio))
        _progress(report.runs[-1])

    for round_no in range(1, rounds + 1):
        bare_run(round_no)
        for config in configs:
            with running_node(models_dir, workdir, args=config.flags(), pool=config.resolved) as node:
                result = asyncio.run(run_batch(node.url, paths, timeout))
                report.runs.append(Run(round_no, config.label, result.wall, audio, result.uploads))
                if round_no == 1 and config is configs[0] and args.latency_requests > 0:
                    report.latency = asyncio.run(
                        measure_latency(node.url, clip, args.latency_requests, args.latency_rate))
            _progress(report.runs[-1])
    bare_run(rounds + 1)
    report.other_cores = meter.other_cores()
    _bracketing_ratios(report)
    print()
    print(f"engine: node vs bare engine, {len(files)} files, {audio:.1f} s of audio "
          f"({', '.join(f'{n} {fmt}' for fmt, n in formats.items())}), model {DEFAULT_MODEL}, {cores} cores, "
          f"{rounds} round(s)")
    print_runs(report)
    print_summary(report, configs)
    return report


def print_ratios(results: Results) -> None:
    """The headline ratio of every section that ran, together: mean of the runs' ratios, and best runs'."""
    rows: list[tuple[str, str, str, str]] = []
    if (engine := results.engine) is not None:
        row = summarize(engine, engine.best)
        verdict = "met" if engine.best_ratio >= 1 else "MISSED"
        rows.append((f"node / bare engine throughput ({engine.best})", f"{row.mean_ratio:.2f}",
                     f"{engine.best_ratio:.2f}", f"target >= 1: {verdict}"))
    if (cache := results.cache) is not None:
        rows.append((f"object-store fetch / cache hit, time ({cache.size >> 20} MiB)", f"{cache.ratio_mean:.1f}",
                     f"{cache.ratio_best:.1f}", "S3 = moto; hit = lease + read"))
    if (scaling := results.scaling) is not None:
        rows.append(("2 nodes / 1 node throughput (1 core each)", f"{scaling.mean_ratio:.2f}",
                     f"{scaling.best_ratio:.2f}", "ideal 2.0"))
    print()
    print(f"ratios, all measured in this run on {os.cpu_count() or 1} cores (mean of the runs; best runs):")
    for label, mean, best, note in rows:
        print(f"  {label:<48} {mean:>6} {best:>6}   {note}")
    if engine is not None and engine.latency is not None:
        lat = engine.latency
        verdict = "met" if lat.p99_ms <= 5 and lat.errors == 0 else "MISSED"
        print(f"  {'submission latency p99, ms':<48} {lat.p99_ms:>6.2f} {'':>6}   target <= 5 ms: {verdict}")


def _progress(run: Run) -> None:
    print(f"  round {run.round}: {run.label:<18} {run.wall:7.2f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
