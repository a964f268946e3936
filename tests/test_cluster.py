"""The cluster for real: nodes in network namespaces joined by a bridge (real mDNS multicast), one valkey and
one moto S3 server in the hub namespace reachable from all of them. Discovery both ways, a rogue node with the
wrong secret, zero-config join, work spread, kill -9 failover, and a node leaving.

The test process stays in the root namespace and talks to the nodes through ``curl`` run in the hub namespace:
no interface or address is ever added to the root namespace."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .audio_fixtures import LONG_TEXT, LONG_WER, SENTENCES, wer
from .netns import Network, remove_stale
from .server_fixtures import FAST_JOBS, REPO

pytestmark = pytest.mark.slow

NS_PREFIX = "v2tcluster"
TOKEN = "cluster-test-token"
SECRET = b"the-cluster-secret"
PEER_TTL = 3.0
START_TIMEOUT = 90.0


class Cluster:
    """The hub's servers and the nodes started in member namespaces."""

    def __init__(self, net: Network, work: Path, models_dir: Path) -> None:
        self.net = net
        self.hub_ip = net.hub_address
        self.redis_url = f"redis://{self.hub_ip}:6379/0"
        self.s3 = f"http://{self.hub_ip}:5000"
        self.bucket = f"v2t-{uuid.uuid4().hex[:8]}"
        self.work = work
        self.models_dir = models_dir
        self.servers: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}

    # -- the hub -------------------------------------------------------------------------------------------

    def start_servers(self) -> None:
        from v2t_node.embedded import find_server

        (self.work / "valkey").mkdir()
        self.servers.append(self._in(self.net.hub, [
            find_server(), "--bind", self.hub_ip, "--port", "6379", "--protected-mode", "no", "--save", "",
            "--appendonly", "yes", "--dir", str(self.work / "valkey")], "valkey"))
        self.servers.append(self._in(self.net.hub, [
            sys.executable, "-m", "moto.server", "-H", self.hub_ip, "-p", "5000"], "moto"))
        self.wait(lambda: self.curl("PUT", f"{self.s3}/{self.bucket}")[0] == 200, 30, "moto")

    def _in(self, namespace: str, argv: list[str], name: str, env: dict[str, str] | None = None
            ) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the process's lifetime
        # `ip netns exec` execs the command: the Popen's pid is the server/node itself.
        return subprocess.Popen(["ip", "netns", "exec", namespace, *argv], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def curl(self, method: str, url: str, *args: str) -> tuple[int, str]:
        """An HTTP request from the hub namespace; (status, body)."""
        r = subprocess.run(
            ["ip", "netns", "exec", self.net.hub, "curl", "-s", "-m", "20", "-o", "-", "-w", "\n%{http_code}",
             "-X", method, "-H", f"Authorization: Bearer {TOKEN}", *args, url],
            capture_output=True, text=True, timeout=30,
        )
        body, _, status = r.stdout.rpartition("\n")
        return int(status or 0), body

    def api(self, node: str, path: str, *args: str, method: str = "GET") -> Any:
        status, body = self.curl(method, self.urls[node] + path, *args)
        assert status < 400, (status, body)
        return json.loads(body)

    @staticmethod
    def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
            except (AssertionError, json.JSONDecodeError, subprocess.TimeoutExpired):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout}s")
            time.sleep(0.2)

    # -- nodes ---------------------------------------------------------------------------------------------

    def start_node(self, member: int, name: str, *flags: str, secret: bytes = SECRET, shared: bool = True,
                   env: dict[str, str] | None = None) -> None:
        address = self.net.addresses[member]
        secret_file = self.work / f"{name}.secret"
        secret_file.write_bytes(secret)
        argv = [sys.executable, "-m", "v2t_node", "--data-dir", str(self.work / name), "--models-dir",
                str(self.models_dir), "start", "--host", address, "--port", "8750", "--node-id", name,
                "--cluster", "blue", "--cluster-secret-file", str(secret_file), *flags]
        if shared:
            argv += ["--redis-url", self.redis_url, "--storage", f"s3://{self.bucket}", "--s3-endpoint", self.s3]
        node_env = {f"V2T_JOBS_{k.upper()}": str(v) for k, v in FAST_JOBS.items()}
        node_env.update(V2T_API_TOKEN=TOKEN, V2T_POOL_PROCESSES="1", V2T_POOL_THREADS="1",
                        V2T_PEERS_PEER_TTL=str(PEER_TTL), AWS_ACCESS_KEY_ID="testing",
                        AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                        AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull,
                        AWS_EC2_METADATA_DISABLED="true", **(env or {}))
        self.nodes[name] = self._in(self.net.members[member], argv, name, node_env)
        self.urls[name] = f"http://{address}:8750"

    def wait_healthy(self, name: str) -> None:
        def healthy() -> bool:
            if self.nodes[name].poll() is not None:
                raise RuntimeError(f"node {name} exited:\n{self.log(name)}")
            return self.curl("GET", self.urls[name] + "/v1/health")[0] == 200

        self.wait(healthy, START_TIMEOUT, f"node {name} healthy")

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-4000:]

    def peers(self, name: str) -> dict[str, dict[str, Any]]:
        return {p["node_id"]: p for p in self.api(name, "/v1/peers")["peers"]}

    def submit(self, name: str, path: Path) -> dict[str, Any]:
        return self.api(name, "/v1/jobs", "-F", f"file=@{path}", method="POST")

    def wait_job(self, name: str, job_id: str, timeout: float = 180) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.api(name, f"/v1/jobs/{job_id}")
            return job if job["state"] in ("completed", "failed", "cancelled") else None

        return self.wait(done, timeout, f"job {job_id} finished")

    def stop_all(self) -> None:
        for proc in [*self.nodes.values(), *self.servers]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Cluster]:
    """Three shared-config nodes (n1..n3) up and discovering each other; torn down whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    remove_stale(NS_PREFIX)
    net = Network(NS_PREFIX, 20 + (os.getpid() + 97) % 200, members=4)
    c = Cluster(net, tmp_path_factory.mktemp("cluster"), models_dir)
    try:
        try:
            net.create()
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"cannot create network namespaces here: {getattr(e, 'stderr', '') or e}")
        c.start_servers()
        for i in range(3):
            c.start_node(i, f"n{i + 1}")
        for i in range(3):
            c.wait_healthy(f"n{i + 1}")
        yield c
    finally:
        c.stop_all()
        net.destroy()
    assert not net.leftovers(), f"namespaces left behind: {net.leftovers()}"


def test_discovery_both_ways(cluster: Cluster) -> None:
    """Every node sees the two others over mDNS (and through the Redis mirror), with their API URLs."""
    for me in ("n1", "n2", "n3"):
        def sees_all(me: str = me) -> dict[str, dict[str, Any]] | None:
            rows = cluster.peers(me)
            others = {k: v for k, v in rows.items() if k != me}
            ok = set(others) == {"n1", "n2", "n3"} - {me} and all("mdns" in r["via"] for r in others.values())
            return rows if ok else None

        rows = cluster.wait(sees_all, 20, f"{me} sees its peers over mDNS")
        for name, row in rows.items():
            if name != me:
                assert row["api_url"] == cluster.urls[name] and row["slots_total"] == 1
                assert row["address"] == cluster.urls[name].split("//")[1].split(":")[0]


def test_rogue_node_with_wrong_secret_is_ignored(cluster: Cluster) -> None:
    """A node with the wrong secret (and its own key prefix, so not in the Redis mirror either) advertises
    itself; the cluster counts its signature as bad and never lists it."""
    cluster.start_node(3, "rogue", "--set", "redis.prefix=rogue:", secret=b"not-the-secret")
    cluster.wait_healthy("rogue")

    def rejected() -> bool:
        body = cluster.api("n1", "/v1/peers")
        return body.get("rejected", {}).get("bad_signature", 0) >= 1

    cluster.wait(rejected, 20, "n1 rejects the rogue's advertisement")
    for me in ("n1", "n2", "n3"):
        assert "rogue" not in cluster.peers(me)
    assert "n1" not in cluster.peers("rogue") or "mdns" not in cluster.peers("rogue")["n1"]["via"]
    cluster.nodes["rogue"].send_signal(signal.SIGTERM)
    cluster.nodes["rogue"].wait(30)


def test_work_spreads_and_any_node_answers(cluster: Cluster, audio_dir: Path) -> None:
    names = ["umbrella.wav", "library.wav", "garden.wav", "speech_8k.wav", "speech.flac", "speech_f32.wav"]
    jobs = [cluster.submit("n1", audio_dir / n) for n in names]
    done = [cluster.wait_job("n2", j["id"]) for j in jobs]
    assert all(j["state"] == "completed" for j in done), done
    assert len({j["node"] for j in done}) >= 2, [j["node"] for j in done]
    status, text = cluster.curl("GET", f"{cluster.urls['n3']}/v1/jobs/{jobs[0]['id']}/transcript?format=txt")
    assert status == 200 and wer(SENTENCES["umbrella"], text) <= 0.25


def test_kill_9_failover(cluster: Cluster, long_audio: Path) -> None:
    """1. a long job runs on some node; 2. that node is killed with SIGKILL; 3. another node reclaims it after
    the heartbeat timeout; 4. it completes once: attempts = 2, one transcript in the bucket, nothing pending."""
    job = cluster.submit("n1", long_audio)

    def running() -> dict[str, Any] | None:
        j = cluster.api("n1", f"/v1/jobs/{job['id']}")
        return j if j["state"] == "running" else None

    victim = cluster.wait(running, 120, "job running")["node"]
    cluster.nodes[victim].send_signal(signal.SIGKILL)
    cluster.nodes[victim].wait(10)
    survivor = next(n for n in ("n1", "n2", "n3") if n != victim)
    done = cluster.wait_job(survivor, job["id"], timeout=240)
    assert (done["state"], done["attempts"]) == ("completed", 2), done
    assert done["node"] != victim
    status, listing = cluster.curl("GET", f"{cluster.s3}/{cluster.bucket}?list-type=2&prefix=transcripts/{job['id']}")
    assert status == 200 and listing.count("<Key>") == 1 and f"{job['id']}.2.json" in listing
    assert cluster.api(survivor, "/v1/health")["queue"] == {"queued": 0, "running": 0, "delayed": 0}
    status, text = cluster.curl("GET", f"{cluster.urls[survivor]}/v1/jobs/{job['id']}/transcript?format=txt")
    assert wer(LONG_TEXT, text) <= LONG_WER
    # The victim left without a goodbye: its peers drop it after the peer TTL.
    cluster.wait(lambda: victim not in cluster.peers(survivor), 4 * PEER_TTL + 10, f"{victim} expired")
    cluster.start_node(int(victim[1]) - 1, victim)  # back for the next tests
    cluster.wait_healthy(victim)


def test_zero_config_join(cluster: Cluster, audio_dir: Path) -> None:
    """A node with only the cluster secret finds a peer, takes the Redis and S3 endpoints from it over an
    authenticated request, joins (visible to the others) and shares the work."""
    cluster.start_node(3, "n4", shared=False)
    cluster.wait_healthy("n4")
    assert "joining cluster blue" in cluster.log("n4")
    cluster.wait(lambda: "n4" in cluster.peers("n1"), 20, "n1 sees n4")
    job = cluster.submit("n4", audio_dir / "garden.wav")
    done = cluster.wait_job("n1", job["id"])  # n4's job is visible on n1: same Redis and bucket
    assert done["state"] == "completed"


def test_node_leaving_is_noticed(cluster: Cluster) -> None:
    cluster.wait(lambda: "n3" in cluster.peers("n1"), 20, "n1 sees n3")
    cluster.nodes["n3"].send_signal(signal.SIGTERM)
    assert cluster.nodes["n3"].wait(60) == 0
    t0 = time.monotonic()
    cluster.wait(lambda: "n3" not in cluster.peers("n1") and "n3" not in cluster.peers("n2"), 10, "n3 gone")
    assert time.monotonic() - t0 < PEER_TTL  # a goodbye, not an expiry
