"""The ``v2t-node`` command: parses, sets up logging, loads config, calls the library, maps the outcome to an
exit code (0 success, 1 failure, 2 usage or configuration error)."""

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec

from scheduler.job import Job
from transcoder.errors import TranscoderError
from transcoder.registry import ModelRegistry

from . import __version__
from .client import ApiError, Client
from .config import Config, load
from .errors import ConfigError, V2TError

log = logging.getLogger("v2t_node")

OK, FAILED, USAGE = 0, 1, 2
FORMATS = ("txt", "json", "srt", "vtt")


def _flags(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line flags as a config layer (only those given)."""
    mapping = {
        "data_dir": ("node", "data_dir"), "node_id": ("node", "id"), "log_level": ("node", "log_level"),
        "host": ("api", "host"), "port": ("api", "port"), "redis_url": ("redis", "url"),
        "processes": ("pool", "processes"), "threads": ("pool", "threads"), "models_dir": ("models", "dir"),
        "url": ("client", "url"),
        "storage": ("storage", "url"), "s3_endpoint": ("storage", "endpoint"), "cache_dir": ("cache", "dir"),
        "cache_max_bytes": ("cache", "max_bytes"), "cluster": ("peers", "cluster"),
        "cluster_secret_file": ("peers", "secret_file"),
    }
    out: dict[str, dict[str, Any]] = {}
    for attr, (section, key) in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    for item in getattr(args, "set", None) or []:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set jobs.max_attempts=5")
        out.setdefault(section, {})[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="v2t-node", description="Distributed speech-to-text node (whisper.cpp).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-c", "--config", help="TOML config file (also $V2T_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config key")
    p.add_argument("--data-dir", help="state directory (node.data_dir)")
    p.add_argument("--models-dir", help="models directory (models.dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="run a node until SIGTERM/SIGINT")
    s.add_argument("--host", help="API bind address (api.host; not loopback requires api.token)")
    s.add_argument("--port", type=int, help="API port (api.port, default 8750)")
    s.add_argument("--redis-url", help="external Redis (redis.url); default: the embedded server")
    s.add_argument("--node-id", help="this node's name (node.id; default: the host name)")
    s.add_argument("--processes", type=int, help="pool processes (pool.processes; default cores - 2, min 1)")
    s.add_argument("--threads", type=int, help="threads per pool process (pool.threads)")
    s.add_argument("--storage", metavar="s3://BUCKET[/PREFIX]",
                   help="S3-compatible object store (storage.url; credentials from the AWS variables/profile)")
    s.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint, e.g. http://minio:9000 (storage.endpoint)")
    s.add_argument("--cache-dir", help="LRU file cache directory (cache.dir)")
    s.add_argument("--cache-max-bytes", type=int, help="LRU file cache size bound (cache.max_bytes)")
    s.add_argument("--cluster", help="cluster name (peers.cluster); nodes only see peers of their cluster")
    s.add_argument("--cluster-secret-file", metavar="PATH",
                   help="file holding the cluster secret (peers.secret_file): signs mDNS records; with no Redis "
                        "and no S3 configured, the node joins the cluster it finds")
    s.add_argument("--log-level", help="debug, info, warning, error")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", default=argparse.SUPPRESS,
                   help="override any config key (also accepted before the command)")
    s.set_defaults(func=cmd_start)

    t = sub.add_parser("transcribe", help="transcribe files (through the running node, or an in-process one)")
    t.add_argument("files", nargs="+", type=Path, metavar="FILE")
    t.add_argument("-f", "--format", choices=FORMATS, default="txt")
    t.add_argument("-o", "--output-dir", type=Path, help="write <name>.<format> per input here")
    t.add_argument("-m", "--model", help="model name (default: models.default)")
    t.add_argument("-l", "--language", help="language code, or auto (multilingual models)")
    t.add_argument("--url", help="the node's API (client.url; default http://127.0.0.1:8750)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    t.add_argument("--redis-url", help="for the in-process node: external Redis")
    t.set_defaults(func=cmd_transcribe)

    j = sub.add_parser("jobs", help="list recent jobs")
    j.add_argument("--state", choices=("queued", "running", "completed", "failed", "cancelled"))
    j.add_argument("-n", "--limit", type=int, default=20)
    j.add_argument("--json", action="store_true", help="JSON output")
    j.add_argument("--url", help="the node's API")
    j.set_defaults(func=cmd_jobs)

    pe = sub.add_parser("peers", help="the cluster as the node sees it")
    pe.add_argument("--json", action="store_true", help="JSON output")
    pe.add_argument("--url", help="the node's API")
    pe.set_defaults(func=cmd_peers)

    m = sub.add_parser("models", help="manage whisper models").add_subparsers(dest="models_cmd", required=True,
                                                                                metavar="ACTION")
    ml = m.add_parser("list", help="installed models")
    ml.set_defaults(func=cmd_models_list)
    mp = m.add_parser("pull", help="download a ggml model (resumable, checksum-verified)")
    mp.add_argument("name")
    mp.add_argument("--from-url", dest="source_url", help="download from this URL instead of models.base_url")
    mp.add_argument("--sha256", help="expected SHA-256 (overrides the built-in catalog)")
    mp.set_defaults(func=cmd_models_pull)
    mi = m.add_parser("import", help="convert a CTranslate2 (faster-whisper) model directory to ggml")
    mi.add_argument("dir", type=Path)
    mi.add_argument("--name", help="model name (default: from the directory)")
    mi.set_defaults(func=cmd_models_import)
    mr = m.add_parser("rm", help="remove an installed model")
    mr.add_argument("name")
    mr.set_defaults(func=cmd_models_rm)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2
        return int(e.code or 0)
    try:
        config = load(args.config, overrides=_flags(args))
    except ConfigError as e:
        print(f"v2t-node: {e}", file=sys.stderr)
        return USAGE
    level = logging.DEBUG if args.verbose else getattr(logging, config.node.log_level.upper())
    if args.command != "start" and not args.verbose:
        level = max(level, logging.WARNING)  # client commands print results, not the node's log
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args, config))
    except (V2TError, TranscoderError, ApiError) as e:
        print(f"v2t-node: {e}", file=sys.stderr)
        return USAGE if isinstance(e, ConfigError) else FAILED
    except KeyboardInterrupt:
        return 130


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coro)


# -- start -------------------------------------------------------------------------------------------------------

def cmd_start(args: argparse.Namespace, config: Config) -> int:
    return _run(serve(config))


async def serve(config: Config) -> int:
    """Runs a node until the first SIGTERM/SIGINT; a second one forces the exit."""
    from .app import Node

    node = Node(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signame)
            os._exit(1)
        log.info("%s: shutting down (again to force)", signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    starting = asyncio.create_task(node.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during startup
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await node.close()
        return OK
    if (exc := starting.exception()) is not None:
        stopping.cancel()
        print(f"v2t-node: cannot start: {exc}", file=sys.stderr)
        return FAILED
    print(f"v2t-node {__version__}: node {node.node_id} serving on {node.url}", file=sys.stderr, flush=True)
    await stopping
    await node.close()
    return OK


# -- transcribe --------------------------------------------------------------------------------------------------

class Progress:
    """One status line on a terminal: files done, overall progress, and the file being transcribed."""

    WIDTH = 30

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0

    def show(self, jobs: "dict[Path, Job]") -> None:
        if not self.enabled:
            return
        done = sum(1 for j in jobs.values() if j.terminal)
        overall = sum(1.0 if j.terminal else j.progress for j in jobs.values()) / len(jobs)
        running = [(p, j) for p, j in jobs.items() if j.state == "running"]
        name, state = (running[0][0].name, f"{running[0][1].progress * 100:3.0f}%") if running else ("", "queued")
        filled = int(self.WIDTH * overall)
        line = (f"[{done}/{len(jobs)}] [{'#' * filled}{'-' * (self.WIDTH - filled)}] {overall * 100:5.1f}%  "
                f"{name[:40]} {state}")
        sys.stderr.write("\r" + line.ljust(self._last))
        sys.stderr.flush()
        self._last = len(line)

    def clear(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r" + " " * self._last + "\r")
            sys.stderr.flush()


def cmd_transcribe(args: argparse.Namespace, config: Config) -> int:
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"v2t-node: no such file: {', '.join(missing)}", file=sys.stderr)
        return USAGE
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        print(f"v2t-node: --output-dir {args.output_dir} is not a directory", file=sys.stderr)
        return USAGE
    return _run(transcribe(args, config))


async def transcribe(args: argparse.Namespace, config: Config) -> int:
    token = config.api_token
    client = Client(config.client_url, token)
    node = None
    try:
        if not await client.alive():
            from .app import Node

            print(f"v2t-node: no node at {config.client_url}; running one in this process", file=sys.stderr)
            await client.close()
            local = msgspec.structs.replace(config.api, host="127.0.0.1", port=0)
            node = Node(msgspec.structs.replace(config, api=local))
            await node.start()
            client = Client(node.url, token)
        return await _transcribe_files(client, args)
    finally:
        await client.close()
        if node is not None:
            await node.close()


async def _transcribe_files(client: Client, args: argparse.Namespace) -> int:
    progress = Progress(sys.stderr.isatty() and not args.no_progress)
    jobs = {}
    for path in args.files:
        jobs[path] = await client.submit_file(path, model=args.model, language=args.language)
    total = len(jobs)
    while True:
        for path, job in jobs.items():
            if not job.terminal:
                jobs[path] = await client.job(job.id)
        progress.show(jobs)
        if all(j.terminal for j in jobs.values()):
            break
        await asyncio.sleep(0.25)
    progress.clear()
    failed = 0
    for path, job in jobs.items():
        if job.state != "completed":
            failed += 1
            reason = f"{job.error.code}: {job.error.message}" if job.error else job.state
            print(f"v2t-node: {path}: {job.state} ({reason})", file=sys.stderr)
            continue
        text = await client.transcript(job.id, args.format)
        if args.output_dir is None and total == 1:
            sys.stdout.buffer.write(text)
            sys.stdout.flush()
            continue
        out_dir = args.output_dir if args.output_dir is not None else path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{path.stem}.{args.format}"
        out.write_bytes(text)
        print(f"{path} -> {out}", file=sys.stderr)
    return FAILED if failed else OK


# -- jobs --------------------------------------------------------------------------------------------------------

def cmd_jobs(args: argparse.Namespace, config: Config) -> int:
    return _run(list_jobs(args, config))


async def list_jobs(args: argparse.Namespace, config: Config) -> int:
    async with Client(config.client_url, config.api_token) as client:
        jobs = await client.jobs(args.state, args.limit)
    if args.json:
        print(msgspec.json.encode(jobs).decode())
        return OK
    print(f"{'ID':<18} {'STATE':<10} {'PROG':>5} {'TRIES':>5} {'MODEL':<10} {'AUDIO':>7} {'AGE':>7}  FILE / ERROR")
    for j in jobs:
        age = _age(time.time() - (j.created_at or time.time()))
        audio = f"{j.duration:.1f}s" if j.duration else "-"
        detail = j.filename or ""
        if j.error and j.state != "completed":
            detail += f"  [{j.error.code}: {j.error.message[:60]}]"
        print(f"{j.id:<18} {j.state:<10} {j.progress * 100:4.0f}% {j.attempts:>5} {j.model:<10} {audio:>7} {age:>7}  "
              f"{detail}")
    return OK


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


# -- peers -------------------------------------------------------------------------------------------------------

def cmd_peers(args: argparse.Namespace, config: Config) -> int:
    return _run(list_peers(args, config))


async def list_peers(args: argparse.Namespace, config: Config) -> int:
    async with Client(config.client_url, config.api_token) as client:
        body = await client.peers()
    if args.json:
        print(msgspec.json.encode(body).decode())
        return OK
    print(f"cluster {body['cluster']}")
    print(f"{'NODE':<20} {'ADDRESS':<16} {'SLOTS':>7} {'RUNNING':>7} {'SEEN':>6}  {'VIA':<11} API")
    now = time.time()
    for p in body["peers"]:
        seen = "self" if p["self"] else _age(now - p["last_seen"]) if p["last_seen"] else "-"
        print(f"{p['node_id']:<20} {p['address'] or '-':<16} {p['slots_free']:>3}/{p['slots_total']:<3} "
              f"{p['jobs_running']:>7} {seen:>6}  {','.join(p['via']):<11} {p['api_url']}")
    return OK


# -- models ------------------------------------------------------------------------------------------------------

def _registry(config: Config) -> ModelRegistry:
    return ModelRegistry(config.models_dir, base_url=config.models.base_url)


def cmd_models_list(args: argparse.Namespace, config: Config) -> int:
    models = _registry(config).list()
    if not models:
        print(f"no models in {config.models_dir} (the default {config.models.default} is installed on first use)")
        return OK
    print(f"{'NAME':<16} {'SIZE':>9}  {'ORIGIN':<9} PATH")
    for m in models:
        print(f"{m.name:<16} {m.size / 1e6:7.1f}MB  {m.origin:<9} {m.path}")
    return OK


def cmd_models_pull(args: argparse.Namespace, config: Config) -> int:
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty and total:
            sys.stderr.write(f"\r{args.name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB ({done * 100 / total:.0f}%)")
            sys.stderr.flush()

    path = _registry(config).pull(args.name, url=args.source_url, sha256=args.sha256, progress=progress)
    if tty:
        sys.stderr.write("\n")
    print(f"{args.name}: {path}")
    return OK


def cmd_models_import(args: argparse.Namespace, config: Config) -> int:
    if not args.dir.is_dir():
        print(f"v2t-node: {args.dir} is not a directory", file=sys.stderr)
        return USAGE
    path = _registry(config).import_dir(args.dir, args.name)
    print(f"imported {args.dir} -> {path}")
    return OK


def cmd_models_rm(args: argparse.Namespace, config: Config) -> int:
    _registry(config).remove(args.name)
    print(f"removed {args.name}")
    return OK
