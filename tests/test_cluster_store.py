"""Nodes sharing one Redis and one S3 bucket (moto's real S3 server): any node answers for any job, audio is
fetched through the LRU file cache, the result cache works across nodes."""

import asyncio
from pathlib import Path

import aiohttp
import pytest

from .audio_fixtures import SENTENCES, wer
from .server_fixtures import wait_for

pytestmark = pytest.mark.slow


async def submit(session: aiohttp.ClientSession, url: str, path: Path) -> dict:
    form = aiohttp.FormData()
    form.add_field("file", path.read_bytes(), filename=path.name)
    async with session.post(f"{url}/v1/jobs", data=form) as r:
        assert r.status in (200, 202), await r.text()
        return await r.json()


async def job(session: aiohttp.ClientSession, url: str, job_id: str) -> dict:
    async with session.get(f"{url}/v1/jobs/{job_id}") as r:
        return await r.json()


async def test_submit_on_one_node_poll_on_another(make_node, redis_url: str, s3_bucket, audio_dir: Path) -> None:
    """1. nodes a and b share valkey and a bucket; 2. a job submitted on a is visible on b with the same state
    and transcript, whichever node ran it; 3. that node fetched the audio from S3 through its file cache (one
    miss) and wrote the transcript to the bucket; 4. the same audio submitted on the other node completes at once
    from the shared result cache."""
    endpoint, bucket = s3_bucket
    storage = {"url": f"s3://{bucket}/v2t", "endpoint": endpoint, "part_size": 5 << 20}
    a = await make_node("a", redis_url=redis_url, storage=storage)
    b = await make_node("b", redis_url=redis_url, storage=storage)
    async with aiohttp.ClientSession() as session:
        created = await submit(session, a.url, audio_dir / "umbrella.wav")

        async def done_on_b() -> dict | None:
            j = await job(session, b.url, created["id"])
            return j if j["state"] == "completed" else None

        seen_b = await wait_for(done_on_b, 120)
        seen_a = await job(session, a.url, created["id"])
        assert seen_a == seen_b
        texts = []
        for node in (a, b):
            async with session.get(f"{node.url}/v1/jobs/{created['id']}/transcript?format=txt") as r:
                texts.append(await r.text())
        assert texts[0] == texts[1] and wer(SENTENCES["umbrella"], texts[0]) <= 0.25
        ran_on = a if seen_b["node"] == "a" else b
        assert ran_on.file_cache is not None and ran_on.file_cache.misses == 1
        assert await ran_on.store.exists(f"transcripts/{created['id']}.1.json")
        # The same audio submitted on the other node completes at once from the shared result cache.
        again = await submit(session, b.url if ran_on is a else a.url, audio_dir / "umbrella.wav")
        assert again["state"] == "completed" and again["cached"] is True
        async with session.get(f"{a.url}/metrics") as r:
            metrics = await r.text()
        assert "v2t_file_cache_misses_total" in metrics


async def test_work_spreads_over_nodes(make_node, redis_url: str, s3_bucket, audio_dir: Path) -> None:
    endpoint, bucket = s3_bucket
    storage = {"url": f"s3://{bucket}", "endpoint": endpoint}
    pool = {"processes": 1, "threads": 1}
    a = await make_node("a", redis_url=redis_url, storage=storage, pool=pool)
    b = await make_node("b", redis_url=redis_url, storage=storage, pool=pool)
    names = ["umbrella.wav", "library.wav", "garden.wav", "fox.wav", "speech_8k.wav", "speech.flac"]
    async with aiohttp.ClientSession() as session:
        ids = [(await submit(session, a.url, audio_dir / n))["id"] for n in names]

        async def all_done() -> list[dict] | None:
            jobs = await asyncio.gather(*(job(session, b.url, i) for i in ids))
            return jobs if all(j["state"] == "completed" for j in jobs) else None

        jobs = await wait_for(all_done, 180)
    by_node = {j["node"] for j in jobs}
    assert by_node == {"a", "b"}, [j["node"] for j in jobs]
    assert a.worker.counts["completed"] + b.worker.counts["completed"] == len(names)


async def test_bad_bucket_fails_start_clearly(make_node, redis_url: str, moto_s3, s3_env) -> None:
    from cache.s3 import BucketNotFound

    with pytest.raises(BucketNotFound, match="no-such-bucket"):
        await make_node("x", redis_url=redis_url, storage={"url": "s3://no-such-bucket", "endpoint": moto_s3.endpoint})


async def test_peers_endpoint_and_join_authentication(make_node, redis_url: str, tmp_path: Path) -> None:
    """1. two nodes on one Redis list each other (membership mirrored in Redis, no multicast needed);
    2. the join endpoint answers only a token signed with the cluster secret, and hands out the shared Redis
    URL but no credentials; 3. a node whose Redis is private to it refuses to act as a join point."""
    from peers.signing import make_token
    from v2t_node.api import PEER_TOKEN_HEADER

    secret = tmp_path / "secret"
    secret.write_text("s3cret-cluster\n")
    peers = {"secret_file": str(secret), "cluster": "blue", "enabled": False}
    a = await make_node("a", redis_url=redis_url, peers=peers)
    b = await make_node("b", redis_url=redis_url, peers=peers)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{a.url}/v1/peers") as r:
            body = await r.json()
        assert body["cluster"] == "blue"
        rows = {p["node_id"]: p for p in body["peers"]}
        assert set(rows) == {"a", "b"} and rows["a"]["self"] and rows["b"]["via"] == ["redis"]
        assert rows["b"]["slots_total"] == 1 and rows["b"]["api_url"] == b.public_url
        url = f"{a.url}/v1/cluster/join"
        async with session.get(url) as r:
            assert r.status == 401
        async with session.get(url, headers={PEER_TOKEN_HEADER: make_token(b"wrong", "c")}) as r:
            assert r.status == 401
        # A loopback Redis URL is private to a's host: a refuses to hand it out.
        async with session.get(url, headers={PEER_TOKEN_HEADER: make_token(b"s3cret-cluster", "c")}) as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "join_unavailable"
    await b.close()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{a.url}/v1/peers") as r:
            assert [p["node_id"] for p in (await r.json())["peers"]] == ["a"]  # b left cleanly


async def test_s3_source(make_node, redis_url: str, s3_bucket, audio_dir: Path) -> None:
    """A JSON submission naming audio already in the bucket (s3://) is streamed from it; a missing key is a 400."""
    from .s3_fixtures import s3_client

    endpoint, bucket = s3_bucket
    async with s3_client(endpoint) as client:
        await client.put_object(Bucket=bucket, Key="inbox/garden.wav", Body=(audio_dir / "garden.wav").read_bytes())
    node = await make_node("s3src", redis_url=redis_url, storage={"url": f"s3://{bucket}/v2t", "endpoint": endpoint})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{node.url}/v1/jobs", json={"source": f"s3://{bucket}/inbox/missing.wav"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "source_not_found"
        async with session.post(f"{node.url}/v1/jobs", json={"source": f"s3://{bucket}/inbox/garden.wav"}) as r:
            created = await r.json()
            assert r.status == 202, created
        assert created["filename"] == "garden.wav"

        async def done() -> dict | None:
            j = await job(session, node.url, created["id"])
            return j if j["state"] == "completed" else None

        await wait_for(done, 120)
        async with session.get(f"{node.url}/v1/jobs/{created['id']}/transcript?format=txt") as r:
            assert wer(SENTENCES["garden"], await r.text()) <= 0.25
