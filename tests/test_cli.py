"""The ``v2t-node`` command as a user runs it: transcribe (through a running node, or an in-process one),
output files and formats, exit codes, ``jobs``, ``models``."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .audio_fixtures import LONG_TEXT, LONG_WER, SENTENCES, wer
from .server_fixtures import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(tmp_path: Path, models_dir: Path):
    """Runs the CLI in a subprocess with its own data dir and the session's models; no node on its URL."""
    port = free_port()

    def run(*args: str, url: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "V2T_NODE_DATA_DIR": str(tmp_path / "data"), "V2T_MODELS_DIR": str(models_dir),
               "V2T_CLIENT_URL": url or f"http://127.0.0.1:{port}", "V2T_POOL_PROCESSES": "1"}
        return subprocess.run([sys.executable, "-m", "v2t_node", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=env, stdin=subprocess.DEVNULL)

    return run


def test_transcribe_one_file_in_process(cli, audio_dir: Path) -> None:
    r = cli("transcribe", str(audio_dir / "umbrella.wav"))
    assert r.returncode == 0, r.stderr
    assert wer(SENTENCES["umbrella"], r.stdout) <= 0.25
    assert "running one in this process" in r.stderr
    assert "\r" not in r.stderr  # no progress bar when stderr is not a terminal


def test_transcribe_many_to_output_dir(cli, audio_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = [audio_dir / "library.wav", audio_dir / "garden.wav", audio_dir / "garbage.wav"]
    r = cli("transcribe", *map(str, files), "--format", "srt", "--output-dir", str(out))
    assert r.returncode == 1, r.stderr  # one input failed
    assert "garbage.wav: failed (undecodable_audio" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["garden.srt", "library.srt"]
    srt = (out / "library.srt").read_text()
    assert srt.startswith("1\n00:00:00,000 --> ")
    text = " ".join(line for line in srt.splitlines() if line and not line[0].isdigit())
    assert wer(SENTENCES["library"], text) <= 0.25


async def test_transcribe_via_node(cli, make_node, audio_dir: Path) -> None:
    """With a node on the client URL, the CLI submits to it (no in-process node) and `jobs` lists the job."""
    import asyncio

    node = await make_node("server")
    r = await asyncio.to_thread(cli, "transcribe", str(audio_dir / "garden.wav"), "--format", "json", url=node.url)
    assert r.returncode == 0, r.stderr
    assert "in this process" not in r.stderr
    transcript = json.loads(r.stdout)
    assert wer(SENTENCES["garden"], transcript["text"]) <= 0.25 and transcript["model"] == "tiny.en"
    assert node.worker.counts["completed"] == 1
    listed = await asyncio.to_thread(cli, "jobs", url=node.url)
    assert listed.returncode == 0 and "completed" in listed.stdout and "garden.wav" in listed.stdout
    as_json = json.loads((await asyncio.to_thread(cli, "jobs", "--json", url=node.url)).stdout)
    assert as_json[0]["filename"] == "garden.wav"


def test_usage_errors_exit_2(cli, tmp_path: Path) -> None:
    r = cli("transcribe", str(tmp_path / "missing.wav"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = cli("transcribe")
    assert r.returncode == 2 and "FILE" in r.stderr
    r = cli("--set", "pool.processes=-3", "transcribe", str(tmp_path))
    assert r.returncode == 2 and "pool.processes" in r.stderr
    r = cli("--set", "api.colour=red", "jobs")
    assert r.returncode == 2 and "unknown field `colour`" in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2


def test_jobs_without_node_is_a_clear_error(cli) -> None:
    r = cli("jobs")
    assert r.returncode == 1 and "cannot reach the node" in r.stderr


def test_models_list_and_rm(cli, models_dir: Path, tmp_path: Path) -> None:
    r = cli("models", "list")
    assert r.returncode == 0 and "tiny.en" in r.stdout and "bundled" in r.stdout
    r = cli("models", "rm", "no-such-model")
    assert r.returncode == 1 and "no-such-model" in r.stderr


def test_models_pull_from_local_server(cli, tiny_en_model: Path, tmp_path: Path, audio_dir: Path) -> None:
    """`models pull` downloads from a (local) HTTP server, verifies the checksum, and the model then transcribes."""
    import functools
    import hashlib
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "ggml-tiny-copy.bin").write_bytes(tiny_en_model.read_bytes())
    digest = hashlib.sha256(tiny_en_model.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mine = tmp_path / "my-models"
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        bad = cli("--models-dir", str(mine), "--set", f"models.base_url={base}", "models", "pull", "tiny-copy",
                  "--sha256", "0" * 64)
        assert bad.returncode == 1 and "checksum" in bad.stderr.lower()
        ok = cli("--models-dir", str(mine), "--set", f"models.base_url={base}", "models", "pull", "tiny-copy",
                 "--sha256", digest)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
    listed = cli("--models-dir", str(mine), "models", "list")
    assert "tiny-copy" in listed.stdout and "pulled" in listed.stdout
    r = cli("--models-dir", str(mine), "transcribe", "--model", "tiny-copy", str(audio_dir / "umbrella.wav"))
    assert r.returncode == 0, r.stderr
    assert wer(SENTENCES["umbrella"], r.stdout) <= 0.25


def test_progress_bar_on_a_terminal(tmp_path: Path, models_dir: Path, long_audio: Path) -> None:
    """With stderr on a terminal, transcribe draws a progress bar that advances; stdout stays the transcript."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "V2T_NODE_DATA_DIR": str(tmp_path / "data"), "V2T_MODELS_DIR": str(models_dir),
           "V2T_CLIENT_URL": f"http://127.0.0.1:{free_port()}", "V2T_POOL_PROCESSES": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "v2t_node", "transcribe", str(long_audio)], cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    stdout = proc.stdout.read() if proc.stdout else b""
    assert proc.wait(60) == 0
    os.close(master)
    overall = [float(p) for p in re.findall(rb"\[0/1\] \[[#-]+\] +([0-9.]+)%  minute.wav", screen)]
    assert overall and 0 < max(overall) < 100, screen[-500:]
    assert overall == sorted(overall)  # it only moves forward
    assert screen.endswith(b"\r")  # the line is cleared at the end
    assert b"[0/1]" not in stdout and wer(LONG_TEXT, stdout.decode()) <= LONG_WER


async def test_peers_command(cli, make_node, redis_url: str) -> None:
    """`v2t-node peers` shows every node of the cluster (here through the Redis mirror) with its slots."""
    import asyncio

    a = await make_node("a", redis_url=redis_url, peers={"cluster": "green"})
    await make_node("b", redis_url=redis_url, peers={"cluster": "green"})
    r = await asyncio.to_thread(cli, "peers", url=a.url)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "cluster green"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"a", "b"} and "self" in rows["a"] and "redis" in rows["b"] and "1/1" in rows["b"]
    as_json = json.loads((await asyncio.to_thread(cli, "peers", "--json", url=a.url)).stdout)
    assert [p["node_id"] for p in as_json["peers"]] == ["a", "b"]
