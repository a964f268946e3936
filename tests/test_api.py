"""The node through its HTTP API: every endpoint and its errors, real transcription of every format (WER against
the spoken sentence), bad inputs, cancellation, pool-process death, and the embedded defaults."""

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from .audio_fixtures import BAD_FILES, FORMAT_FILES, LONG_TEXT, LONG_WER, SENTENCES, SPEECH_SENTENCE, wer
from .server_fixtures import wait_for

pytestmark = pytest.mark.slow


class Api:
    """A JSON client of one node, for tests."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def submit(self, path: Path, status: int = 202, **fields: str) -> dict:
        form = aiohttp.FormData()
        for k, v in fields.items():
            form.add_field(k, v)
        form.add_field("file", path.read_bytes(), filename=path.name)
        async with self.session.post(f"{self.url}/v1/jobs", data=form) as r:
            body = await r.json()
            assert r.status == status, body
            return body

    async def get(self, path: str, status: int = 200) -> dict:
        async with self.session.get(self.url + path) as r:
            body = await r.json()
            assert r.status == status, body
            return body

    async def job(self, job_id: str) -> dict:
        return await self.get(f"/v1/jobs/{job_id}")

    async def wait(self, job_id: str, timeout: float = 120) -> dict:
        async def terminal() -> dict | None:
            job = await self.job(job_id)
            return job if job["state"] in ("completed", "failed", "cancelled") else None

        return await wait_for(terminal, timeout, interval=0.1)

    async def text(self, job_id: str, fmt: str = "txt") -> str:
        async with self.session.get(f"{self.url}/v1/jobs/{job_id}/transcript", params={"format": fmt}) as r:
            assert r.status == 200, await r.text()
            return await r.text()


@pytest.fixture
async def api(make_node):
    node = await make_node("api-node")
    async with aiohttp.ClientSession() as session:
        yield Api(node.url, session), node


async def test_transcribes_every_format(api, audio_dir: Path) -> None:
    """Each container/codec/rate/width/layout is transcribed to the spoken sentence (WER <= 0.25)."""
    client, node = api
    jobs = {name: (await client.submit(audio_dir / name))["id"] for name in FORMAT_FILES}
    scores = {}
    for name, job_id in jobs.items():
        job = await client.wait(job_id)
        assert job["state"] == "completed", (name, job)
        scores[name] = wer(SENTENCES[SPEECH_SENTENCE], await client.text(job_id))
    assert all(score <= 0.25 for score in scores.values()), scores
    # Same audio bytes are cached; different encodings of it are not the same bytes, so each really ran.
    assert node.worker.counts["completed"] == len(FORMAT_FILES)


async def test_job_record_and_transcript_formats(api, audio_dir: Path) -> None:
    client, _ = api
    job = await client.submit(audio_dir / "umbrella.wav", id="umbrella-1")
    assert job["id"] == "umbrella-1" and job["state"] == "queued" and job["filename"] == "umbrella.wav"
    done = await client.wait("umbrella-1")
    for key in ("id", "state", "progress", "attempts", "model", "language", "duration", "created_at",
                "started_at", "finished_at", "node", "error"):
        assert key in done
    assert done["state"] == "completed" and done["progress"] == 1.0 and done["attempts"] == 1
    assert done["model"] == "tiny.en" and done["language"] == "en" and done["node"] == "api-node"
    assert 3 < done["duration"] < 8 and done["error"] is None
    txt = await client.text("umbrella-1", "txt")
    assert wer(SENTENCES["umbrella"], txt) <= 0.25
    srt = await client.text("umbrella-1", "srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and "umbrella" in srt.lower()
    vtt = await client.text("umbrella-1", "vtt")
    assert vtt.startswith("WEBVTT\n\n") and "-->" in vtt
    js = await client.get("/v1/jobs/umbrella-1/transcript?format=json")
    assert js["model"] == "tiny.en" and js["segments"] and js["segments"][0]["start"] == 0.0
    assert "[BLANK_AUDIO]" not in txt


async def test_listing_and_errors(api, audio_dir: Path) -> None:
    client, _ = api
    a = await client.submit(audio_dir / "garden.wav")
    await client.wait(a["id"])
    listed = await client.get("/v1/jobs?state=completed&limit=5")
    assert [j["id"] for j in listed["jobs"]] == [a["id"]]
    assert (await client.get("/v1/jobs?state=failed"))["jobs"] == []
    for query in ("state=bogus", "limit=0", "limit=abc"):
        err = await client.get(f"/v1/jobs?{query}", status=400)
        assert err["error"]["code"] == "bad_request"
    assert (await client.get("/v1/jobs/nope", status=404))["error"]["code"] == "job_not_found"
    assert (await client.get("/v1/jobs/nope/transcript", status=404))["error"]["code"] == "job_not_found"
    assert (await client.get(f"/v1/jobs/{a['id']}/transcript?format=doc", status=400))["error"]["code"] == \
        "bad_request"
    assert (await client.get("/v1/nothing", status=404))["error"]["code"] == "not_found"
    async with client.session.delete(f"{client.url}/v1/jobs/{a['id']}") as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "job_conflict"
    async with client.session.put(f"{client.url}/v1/jobs") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


async def test_submission_errors(api, audio_dir: Path) -> None:
    client, node = api
    url = f"{client.url}/v1/jobs"
    cases = [
        (dict(data=b"raw", headers={"Content-Type": "audio/wav"}), 415, "unsupported_media_type"),
        (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "bad_request"),
        (dict(json={"source": "file:///x", "colour": "red"}), 400, "bad_request"),
        (dict(json={"source": "ftp://host/a.wav"}), 400, "unsupported_source"),
        (dict(json={"source": "file:///no/such/file.wav"}), 400, "source_not_found"),
        (dict(json={"source": f"file://{audio_dir / 'speech.wav'}", "model": "huge-v9"}), 400, "model_not_found"),
        (dict(json={"source": f"file://{audio_dir / 'speech.wav'}", "language": "de"}), 400, "bad_request"),
        (dict(json={"source": f"file://{audio_dir / 'speech.wav'}", "id": "../etc"}), 400, "bad_request"),
    ]
    for kwargs, status, code in cases:
        async with client.session.post(url, **kwargs) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (status, code), (kwargs, body)
            assert body["error"]["message"]
    form = aiohttp.FormData()
    form.add_field("model", "tiny.en", content_type="text/plain")  # a part with a type forces multipart
    async with client.session.post(url, data=form) as r:  # multipart without a file
        assert r.status == 400 and "no 'file' part" in (await r.json())["error"]["message"]
    assert (await client.get("/v1/health"))["status"] == "ok"
    assert await node.queue.list() == []  # nothing half-created


async def test_file_source_and_idempotency(api, audio_dir: Path) -> None:
    client, _ = api
    body = {"source": f"file://{audio_dir / 'library.wav'}", "id": "lib"}
    async with client.session.post(f"{client.url}/v1/jobs", json=body) as r:
        assert r.status == 202
    async with client.session.post(f"{client.url}/v1/jobs", json=body) as r:
        assert r.status == 200 and (await r.json())["id"] == "lib"  # the existing job, not a new one
    done = await client.wait("lib")
    assert wer(SENTENCES["library"], await client.text("lib")) <= 0.25
    # Idempotency-Key: a retried POST returns the first job.
    headers = {"Idempotency-Key": "upload-42"}
    async with client.session.post(f"{client.url}/v1/jobs", json={"source": body["source"]}, headers=headers) as r:
        first = await r.json()
    async with client.session.post(f"{client.url}/v1/jobs", json={"source": body["source"]}, headers=headers) as r:
        assert (await r.json())["id"] == first["id"]
    # The same audio again completes at once from the result cache (200, completed, cached).
    again = await client.submit(audio_dir / "library.wav", status=200)
    assert again["state"] == "completed" and again["cached"] is True and again["id"] != done["id"]
    assert await client.text(again["id"]) == await client.text("lib")


async def test_http_source(api, audio_dir: Path) -> None:
    from aiohttp import web

    client, _ = api
    app = web.Application()
    app.router.add_static("/files", audio_dir)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with client.session.post(f"{client.url}/v1/jobs",
                                       json={"source": f"http://127.0.0.1:{port}/files/garden.wav"}) as r:
            job = await r.json()
            assert r.status == 202, job
        async with client.session.post(f"{client.url}/v1/jobs",
                                       json={"source": f"http://127.0.0.1:{port}/files/missing.wav"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "source_not_found"
        done = await client.wait(job["id"])
        assert done["filename"] == "garden.wav"
        assert wer(SENTENCES["garden"], await client.text(job["id"])) <= 0.25
    finally:
        await runner.cleanup()


async def test_bad_inputs_fail_at_once_and_node_stays_healthy(api, audio_dir: Path) -> None:
    """Empty, garbage, text-named-.wav, truncated and video-without-audio files each fail on the first attempt
    with their error code; the node then still transcribes a good file."""
    client, node = api
    ids = {name: (await client.submit(audio_dir / name))["id"] for name in BAD_FILES}
    for name, code in BAD_FILES.items():
        job = await client.wait(ids[name])
        assert (job["state"], job["attempts"], job["error"]["code"]) == ("failed", 1, code), (name, job)
        assert job["error"]["message"]
        async with client.session.get(f"{client.url}/v1/jobs/{ids[name]}/transcript") as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "transcript_not_ready"
    health = await client.get("/v1/health")
    assert health["status"] == "ok" and health["pool"]["crashes"] == 0
    good = await client.submit(audio_dir / "speech.wav")
    assert (await client.wait(good["id"]))["state"] == "completed"


async def test_upload_limit(make_node, audio_dir: Path) -> None:
    node = await make_node("small", api={"max_upload_bytes": 10_000})
    async with aiohttp.ClientSession() as session:
        client = Api(node.url, session)
        err = await client.submit(audio_dir / "speech.wav", status=413)
        assert err["error"]["code"] == "payload_too_large"
        assert await node.queue.list() == []
        assert not list((node.config.storage_dir / "audio").glob("*"))  # the partial upload is gone
        assert (await client.get("/v1/health"))["status"] == "ok"


async def test_cancel_running_job(api, long_audio: Path) -> None:
    client, node = api
    job = await client.submit(long_audio)

    async def progressing() -> bool:
        j = await client.job(job["id"])
        return j["state"] == "running"

    await wait_for(progressing, 60)
    async with client.session.delete(f"{client.url}/v1/jobs/{job['id']}") as r:
        assert r.status == 202
    done = await client.wait(job["id"], timeout=30)
    assert done["state"] == "cancelled" and done["attempts"] == 1
    assert node.pool.crashes == 0 and node.pool.busy == 0  # whisper.cpp stopped through its abort callback


async def test_pool_process_death_is_retried(api, long_audio: Path, audio_dir: Path) -> None:
    """1. a job runs in the pool; 2. its pool process is killed with SIGKILL; 3. the process is replaced and the
    job retried: it completes with attempts = 2; 4. the node stays healthy."""
    client, node = api
    job = await client.submit(long_audio)
    await wait_for(lambda: _running(client, job["id"]), 60)
    victim = node.pool.pids[0]
    os.kill(victim, signal.SIGKILL)
    done = await client.wait(job["id"], timeout=180)
    assert (done["state"], done["attempts"]) == ("completed", 2), done
    assert node.pool.crashes == 1 and node.pool.pids and victim not in node.pool.pids
    text = await client.text(job["id"])
    assert wer(LONG_TEXT, text) <= LONG_WER
    health = await client.get("/v1/health")
    assert health["status"] == "ok" and health["pool"]["processes"] == 1


async def _running(client: Api, job_id: str) -> bool:
    j = await client.job(job_id)
    return j["state"] == "running"


async def test_metrics(api, audio_dir: Path) -> None:
    client, _ = api
    job = await client.submit(audio_dir / "speech.wav")
    await client.wait(job["id"])
    async with client.session.get(f"{client.url}/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    assert 'v2t_jobs_submitted_total{cached="no"} 1.0' in text
    assert 'v2t_attempts_total{outcome="completed"} 1.0' in text
    assert "v2t_pool_processes 1.0" in text and "v2t_submit_seconds_bucket" in text
    assert "v2t_audio_seconds_total" in text


async def test_token_required_when_configured(make_node, audio_dir: Path) -> None:
    node = await make_node("secured", api={"token": "s3cret"})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{node.url}/v1/jobs") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        async with session.get(f"{node.url}/v1/health") as r:  # probes stay open
            assert r.status == 200
        async with session.get(f"{node.url}/v1/jobs", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200


async def test_embedded_defaults(make_node, audio_dir: Path) -> None:
    """No Redis URL: the node runs valkey itself (AOF on, in its data dir) and stops it on close."""
    node = await make_node("embedded")
    assert node.embedded is not None and node.redis_url.startswith("unix://")
    pid = node.embedded.pid
    info = await node.redis.info("persistence")
    assert info["aof_enabled"] == 1
    async with aiohttp.ClientSession() as session:
        client = Api(node.url, session)
        job = await client.submit(audio_dir / "speech.wav")
        assert (await client.wait(job["id"]))["state"] == "completed"
    await node.close()
    await asyncio.sleep(0.1)
    assert not _alive(pid)
    assert (node.config.data_dir / "redis" / "appendonlydir").is_dir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
