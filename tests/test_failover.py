"""Nodes as real processes: kill -9 in the middle of a job, graceful and forced shutdown, and the embedded server
never outliving its node."""

import asyncio
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from scheduler.keys import GROUP, Keys

from .audio_fixtures import LONG_TEXT, LONG_WER, wer
from .server_fixtures import NodeProcess, fast_env

pytestmark = pytest.mark.slow


def submit(node: NodeProcess, path: Path) -> str:
    body = json.dumps({"source": f"file://{path}"}).encode()
    req = urllib.request.Request(f"{node.url}/v1/jobs", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["id"]


def get(node: NodeProcess, path: str) -> dict:
    with urllib.request.urlopen(node.url + path, timeout=10) as r:
        return json.load(r)


def wait_job(node: NodeProcess, job_id: str, ok, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = get(node, f"/v1/jobs/{job_id}")
        if ok(job):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} stuck: {job}\n{node.log.read_text()[-3000:]}")
        time.sleep(0.1)


def running(job: dict) -> bool:
    return job["state"] == "running"


def terminal(job: dict) -> bool:
    return job["state"] in ("completed", "failed", "cancelled")


def test_killed_node_job_is_reclaimed(redis_url: str, node_process, long_audio: Path, tmp_path: Path) -> None:
    """1. nodes a and b share one valkey and one object store; only a runs at first;
    2. a takes a long job and is killed with SIGKILL mid-transcription;
    3. b, started afterwards, reclaims the entry once it has been idle for the heartbeat timeout;
    4. the job completes exactly once: attempts = 2, one transcript, nothing left pending."""
    env = fast_env(V2T_STORAGE_PATH=str(tmp_path / "objects"))
    a = node_process("a", "--redis-url", redis_url, env=env)
    job_id = submit(a, long_audio)
    wait_job(a, job_id, running, timeout=60)
    pool_pids = get(a, "/v1/health")["pool"]["pids"]
    a.kill()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pool_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pool_pids)  # no orphan keeps transcribing the job
    b = node_process("b", "--redis-url", redis_url, env=env)
    job = wait_job(b, job_id, terminal, timeout=180)
    assert (job["state"], job["attempts"], job["node"]) == ("completed", 2, "b"), job
    transcripts = sorted(p.name for p in (tmp_path / "objects" / "transcripts").iterdir())
    assert transcripts == [f"{job_id}.2.json"]
    keys = Keys()
    with redis.Redis.from_url(redis_url) as r:
        assert r.xpending(keys.stream, GROUP)["pending"] == 0
        assert r.xlen(keys.stream) == 0 and r.zcard(keys.retry) == 0
    text = json.loads((tmp_path / "objects" / "transcripts" / transcripts[0]).read_text())["text"]
    assert wer(LONG_TEXT, text) <= LONG_WER


def test_sigterm_hands_running_job_back(redis_url: str, node_process, long_audio: Path, tmp_path: Path) -> None:
    """1. a runs a long job; 2. SIGTERM with a short shutdown grace: a exits 0 and the job goes back to the queue
    without counting the attempt; 3. b completes it with attempts = 1."""
    env = fast_env(V2T_STORAGE_PATH=str(tmp_path / "objects"), V2T_JOBS_SHUTDOWN_GRACE="0.2")
    a = node_process("a", "--redis-url", redis_url, env=env)
    job_id = submit(a, long_audio)
    wait_job(a, job_id, running, timeout=60)
    t0 = time.monotonic()
    assert a.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 20
    log = a.log.read_text()
    assert "shutting down" in log and "stopped" in log
    with redis.Redis.from_url(redis_url) as r:
        h = r.hgetall(Keys().job(job_id))
        assert h[b"state"] == b"queued" and h[b"attempt"] == b"0"
    b = node_process("b", "--redis-url", redis_url, env=env)
    job = wait_job(b, job_id, terminal, timeout=180)
    assert (job["state"], job["attempts"], job["node"]) == ("completed", 1, "b")


def test_second_signal_forces_exit(redis_url: str, node_process, long_audio: Path, tmp_path: Path) -> None:
    env = fast_env(V2T_JOBS_SHUTDOWN_GRACE="60")
    a = node_process("a", "--redis-url", redis_url, env=env)
    job_id = submit(a, long_audio)
    wait_job(a, job_id, running, timeout=60)
    assert a.process is not None
    a.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    a.process.send_signal(signal.SIGTERM)
    assert a.process.wait(10) == 1
    assert time.monotonic() - t0 < 5
    assert "exiting now" in a.log.read_text()


def test_embedded_server_dies_with_its_node(node_process) -> None:
    """kill -9 of a node that runs the embedded valkey: the server is not left running (PDEATHSIG), and a
    restarted node starts its own server on the same data (AOF) and sees the jobs it had."""
    a = node_process("solo", env=fast_env())
    pid = int(get(a, "/v1/health")["pool"]["processes"])  # health answers; now find the embedded server
    server = _child_named(a.process.pid, "valkey-server")
    assert server is not None and pid == 1
    job_id = submit(a, Path(__file__).parent.parent / "examples" / "hello.wav")
    wait_job(a, job_id, terminal)
    a.kill()
    deadline = time.monotonic() + 10
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server)
    again = NodeProcess(a.data_dir, a.args[a.args.index("--models-dir") + 1], env=fast_env())
    again.start()
    try:
        job = get(again, f"/v1/jobs/{job_id}")
        assert job["state"] == "completed"  # persisted in the AOF
    finally:
        again.stop()


def _child_named(parent: int, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == name and int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


async def test_redis_outage_and_recovery(make_node, tmp_path: Path, audio_dir: Path) -> None:
    """1. a node runs on an external valkey; 2. the valkey dies: health says 503 degraded, a submission gets
    503 queue_unavailable, the node keeps serving; 3. valkey comes back on the same port (same AOF): the node
    recovers by itself and transcribes again."""
    import aiohttp

    from .server_fixtures import ValkeyServer

    server = ValkeyServer(tmp_path / "valkey", appendonly=True)  # as production Redis should run
    server.start()
    try:
        node = await make_node("outage", redis_url=server.url)
        async with aiohttp.ClientSession() as session:
            async def post() -> tuple[int, dict]:
                form = aiohttp.FormData()
                form.add_field("file", (audio_dir / "garden.wav").read_bytes(), filename="garden.wav")
                async with session.post(f"{node.url}/v1/jobs", data=form) as r:
                    return r.status, await r.json()

            server.stop()
            async with session.get(f"{node.url}/v1/health") as r:
                body = await r.json()
                assert r.status == 503 and body["status"] == "degraded" and "unreachable" in body["redis"]
            status, body = await post()
            assert (status, body["error"]["code"]) == (503, "queue_unavailable"), body
            server.start()  # same port
            deadline = time.monotonic() + 30
            while True:
                async with session.get(f"{node.url}/v1/health") as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < deadline, "node did not recover"
                await asyncio.sleep(0.2)
            status, job = await post()
            assert status == 202, job
            while job["state"] not in ("completed", "failed"):
                await asyncio.sleep(0.1)
                async with session.get(f"{node.url}/v1/jobs/{job['id']}") as r:
                    job = await r.json()
            assert job["state"] == "completed"
    finally:
        server.stop()


def test_start_fails_clearly_without_redis(tmp_path: Path, models_dir: Path) -> None:
    import subprocess
    import sys

    from .server_fixtures import REPO, free_port

    r = subprocess.run(
        [sys.executable, "-m", "v2t_node", "--data-dir", str(tmp_path), "--models-dir", str(models_dir), "start",
         "--port", str(free_port()), "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert r.returncode == 1 and "is unreachable" in r.stderr
