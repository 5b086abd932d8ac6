"""Deployment: the repository's nginx template in front of two real replicas, on loopback.

docker-compose.yml runs replicas of the image behind nginx with deploy/nginx.conf.template.
Here the same template is rendered for two `dynamerge serve` processes on the micro zoo and
run by Debian's nginx (.ci/run installs it); traffic goes through it with the official
`openai` client (tests/test_image.py does the same with two containers of the built image).
The files Docker alone reads are checked for the wiring these tests rely on.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from deploy_harness import (
    HEALTHCHECK,
    REPO,
    Load,
    Nginx,
    Outcome,
    Replica,
    free_port,
)
from openai import OpenAI

from adapters.zoo.micro import MicroZoo, topic_prompts
from app.settings import Settings

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (.ci/run installs it; locally: apt-get install nginx-light)",
)

DRAIN_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 240.0
# Long enough that every replica has requests in flight at any moment of the load, and that
# a stream has many chunks; prompt plus answer stays under the micro model's 256 positions.
MAX_TOKENS = 160
WORKERS = 4
PROMPTS = [p for topic in ("math", "cooking", "travel") for p in topic_prompts(topic, 8)]
CHAT_PATH = "/v1/chat/completions"


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx: Nginx

    def client(self, base_url: str | None = None) -> OpenAI:
        # No client retries: every failure must be visible to the test, not papered over.
        return OpenAI(
            base_url=f"{base_url or self.nginx.url}/v1", api_key="unused", max_retries=0,
            timeout=openai.Timeout(120, connect=5),
        )

    def stop(self) -> None:
        for process in [self.nginx, *self.replicas]:
            process.stop()

    def logs(self) -> str:
        parts = [f"--- {r.name} ({r.address}) ---\n{r.log()}" for r in self.replicas]
        parts.append(f"--- nginx error.log ---\n{self.nginx.error_log()}")
        return "\n".join(parts)


def _launch(zoo: MicroZoo, root: Path) -> Cluster:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMERGE_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # Two replicas, nginx and the test share two cores: one thread per replica.
        OMP_NUM_THREADS="1",
        DYNAMERGE_BASE_MODEL=str(zoo.base_dir),
        DYNAMERGE_ADAPTER_STORE=str(zoo.store_dir),
        DYNAMERGE_HOST="127.0.0.1",
        DYNAMERGE_DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
    )
    replicas = []
    for name in ("a", "b"):
        port = free_port()
        replica_env = {
            **env, "DYNAMERGE_PORT": str(port), "DYNAMERGE_CACHE_DIR": str(root / f"cache-{name}")
        }
        replicas.append(Replica(name, port, replica_env, root / f"replica-{name}.log"))
    assert NGINX is not None
    nginx = Nginx(NGINX, root / "nginx", free_port(), [r.address for r in replicas])
    cluster = Cluster(replicas, nginx)
    try:
        for replica in replicas:  # both load at once
            replica.start()
        for replica in replicas:
            replica.wait_ready(READY_TIMEOUT_S)
        nginx.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(micro_zoo: MicroZoo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Shared by the tests that leave both replicas running."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    started = _launch(micro_zoo, tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


@pytest.fixture
def fresh_cluster(
    micro_zoo: MicroZoo, tmp_path: Path
) -> Iterator[Callable[[], Cluster]]:
    """For the tests that stop a replica."""
    started: list[Cluster] = []

    def start() -> Cluster:
        started.append(_launch(micro_zoo, tmp_path))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def _chat(client: OpenAI, index: int, stream: bool) -> None:
    """One chat request; raises unless it ended properly (a finish_reason, stream or not)."""
    messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
    if not stream:
        completion = client.chat.completions.create(
            model="auto", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        finish = completion.choices[0].finish_reason
    else:
        finish = None
        for chunk in client.chat.completions.create(
            model="auto", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                finish = chunk.choices[0].finish_reason
    if finish not in ("stop", "length"):
        raise AssertionError(f"request ended without a proper finish_reason: {finish!r}")


def _mixed_load(cluster: Cluster, max_requests: int, max_seconds: float) -> Load:
    client = cluster.client()
    return Load(
        lambda i: _chat(client, i, stream=i % 2 == 1), WORKERS, max_requests, max_seconds
    ).start()


def _wait_for_work(replica: Replica, timeout_s: float = 10.0) -> None:
    """Block until the replica is generating (its /metrics say so), or at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)  # let the load reach both replicas
    while time.monotonic() < deadline:
        running = replica.running_requests()
        if running is None or running > 0:  # no gauge: the time above has to do
            return
        time.sleep(0.05)


def _failures(outcomes: list[Outcome]) -> list[str]:
    return [f"request {o.index} at {o.start:.3f}: {o.error}" for o in outcomes if not o.ok]


def _healthcheck(port: int) -> int:
    """The container's health check (deploy/healthcheck.py), run against a loopback replica."""
    env = {**os.environ, "DYNAMERGE_PORT": str(port)}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=30).returncode


def _counted_requests(replica: Replica) -> float:
    """Chat requests the replica itself counted (dynamerge_requests_total)."""
    text = httpx.get(f"{replica.url}/metrics", timeout=5).text
    pattern = rf'^dynamerge_requests_total{{[^}}]*endpoint="{CHAT_PATH}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def _arrival_groups(times: list[float], gap_s: float = 0.0005) -> int:
    """How many separate arrivals the chunks came in: chunks read together are one group."""
    return 1 + sum(1 for a, b in itertools.pairwise(times) if b - a > gap_s)


def _stream_arrivals(client: OpenAI, prompt: str) -> tuple[list[float], str | None]:
    times, finish = [], None
    start = time.monotonic()
    for chunk in client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True,
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.monotonic() - start)
        if chunk.choices and chunk.choices[0].finish_reason is not None:
            finish = chunk.choices[0].finish_reason
    return times, finish


# --- through the proxy, both replicas up --------------------------------------------------


@needs_nginx
def test_requests_spread_over_both_replicas(cluster: Cluster) -> None:
    before = [_counted_requests(r) for r in cluster.replicas]
    load = _mixed_load(cluster, max_requests=24, max_seconds=120)
    outcomes = load.finish(timeout_s=150, stop=False)

    assert len(outcomes) == 24
    assert _failures(outcomes) == [], cluster.logs()
    served = [e for e in cluster.nginx.access_log() if CHAT_PATH in e.request]
    by_replica = {r.address: 0 for r in cluster.replicas}
    for entry in served:
        assert entry.status == 200, entry
        by_replica[entry.upstreams[-1]] += 1
    # least_conn over equal replicas: neither may be left idle (a fair split is 12 and 12).
    assert min(by_replica.values()) >= 4, by_replica
    # The replicas' own counters agree with nginx about who did the work.
    after = [_counted_requests(r) for r in cluster.replicas]
    for replica, b, a in zip(cluster.replicas, before, after, strict=True):
        assert a - b == by_replica[replica.address], (replica.name, b, a, by_replica)


@needs_nginx
def test_stream_arrives_incrementally_and_ends_properly(cluster: Cluster) -> None:
    body = {
        "model": "auto", "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
    }
    with httpx.stream(
        "POST", f"{cluster.nginx.url}{CHAT_PATH}", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        # Re-added by the template for any proxy further out (nginx hides the replica's own).
        assert response.headers.get("x-accel-buffering") == "no"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in events[-2].replace(" ", "") or (
        '"finish_reason":"stop"' in events[-2].replace(" ", "")
    )

    # Incremental: chunks must come about as separately as straight from the replica (a
    # proxy that holds a stream back, by buffering, compressing or caching it, delivers it in
    # a few bursts or all at the end). Measured against the replica itself, so that a busy
    # machine moves both sides.
    direct = cluster.client(cluster.replicas[0].url)
    proxied = cluster.client()
    direct_times, _ = _stream_arrivals(direct, PROMPTS[0])
    best = 0
    for _ in range(3):
        times, finish = _stream_arrivals(proxied, PROMPTS[0])
        assert finish in ("stop", "length")
        assert len(times) >= 20, "the stream is too short to tell"
        best = max(best, _arrival_groups(times))
        if best >= _arrival_groups(direct_times) / 2:
            break
    assert best >= max(5, _arrival_groups(direct_times) / 2), (best, len(times))


@needs_nginx
def test_container_healthcheck_follows_readiness(cluster: Cluster) -> None:
    assert _healthcheck(cluster.replicas[0].port) == 0
    assert _healthcheck(free_port()) == 1  # nothing listens there


# --- one replica goes away under load ------------------------------------------------------


@needs_nginx
def test_sigterm_drains_one_replica_while_the_other_takes_over(
    fresh_cluster: Callable[[], Cluster],
) -> None:
    cluster = fresh_cluster()
    draining, other = cluster.replicas
    load = _mixed_load(cluster, max_requests=400, max_seconds=120)
    try:
        _wait_for_work(draining)
        sigterm_at = time.time()
        draining.signal(signal.SIGTERM)

        # Readiness drops at once, so that probes and balancers stop sending work.
        deadline = time.monotonic() + 2
        status: int | str = 200
        while status == 200 and time.monotonic() < deadline:
            try:
                status = httpx.get(f"{draining.url}/ready", timeout=1).status_code
            except httpx.HTTPError as exc:  # the listener may already be closed
                status = type(exc).__name__
        assert status != 200, "/ready still 200 two seconds after SIGTERM"
        time.sleep(4)  # new requests keep coming while it drains and after it has gone
    finally:
        outcomes = load.finish(timeout_s=DRAIN_TIMEOUT_S + 60)

    code = draining.wait_exit(DRAIN_TIMEOUT_S + 30)
    # Every request succeeded: those in flight on the draining replica finished there, and
    # new ones were answered by the other replica (nginx retries a 503 or a refused
    # connection there).
    assert _failures(outcomes) == [], cluster.logs()
    assert sum(o.start > sigterm_at for o in outcomes) >= 5, "too little load after SIGTERM"

    entries = [e for e in cluster.nginx.access_log() if CHAT_PATH in e.request]
    assert all(e.status == 200 for e in entries), entries
    # Requests the draining replica had accepted finished there: none was re-run elsewhere,
    # which would hide a drain that drops its work.
    accepted = [e for e in entries if e.start < sigterm_at and draining.address in e.upstreams]
    # A request nginx began in the last instant before the signal may reach the replica just
    # after it, be refused with 503 and retried (nginx's clock starts at the first byte it
    # read, not when it picked the replica): a quarter second of margin for those.
    rerun = [e for e in accepted
             if e.upstreams != (draining.address,) and e.start < sigterm_at - 0.25]
    assert rerun == [], rerun
    spanning = [e for e in accepted if e.end > sigterm_at and e.upstreams == (draining.address,)]
    assert spanning, "no request was in flight on the draining replica at SIGTERM"
    # Work sent after SIGTERM (once the signal had surely landed) was answered by the other.
    late = [e for e in entries if e.start > sigterm_at + 0.5]
    assert late and all(e.upstreams[-1] == other.address for e in late), late
    assert httpx.get(f"{other.url}/ready", timeout=5).status_code == 200
    # Last, so that a wrong status does not hide how the drain itself went. -15 (143 in a
    # shell) means the process was ended by the signal itself, not by finishing its drain.
    assert code == 0, f"drained replica exit status {code}\n{draining.log()}"


@needs_nginx
def test_killed_replica_is_routed_around(fresh_cluster: Callable[[], Cluster]) -> None:
    cluster = fresh_cluster()
    killed, survivor = cluster.replicas
    load = _mixed_load(cluster, max_requests=400, max_seconds=120)
    try:
        _wait_for_work(killed)
        killed_at = time.time()
        killed.signal(signal.SIGKILL)
        time.sleep(4)
    finally:
        outcomes = load.finish(timeout_s=60)

    assert killed.wait_exit(10) == -signal.SIGKILL
    in_flight = [o for o in outcomes if o.start < killed_at < o.end]
    failures = [o for o in outcomes if not o.ok]
    # At most the requests in flight on the killed replica fail (streams already under way;
    # nginx re-runs the others elsewhere); everything sent after the kill succeeds.
    assert len(failures) <= len(in_flight) <= WORKERS, _failures(outcomes)
    assert all(o.start < killed_at for o in failures), _failures(outcomes)
    after = [o for o in outcomes if o.start > killed_at]
    assert len(after) >= 5, "too little load after the kill"
    late = [
        e for e in cluster.nginx.access_log() if CHAT_PATH in e.request and e.start > killed_at
    ]
    assert late and all(e.status == 200 and e.upstreams[-1] == survivor.address for e in late)


# --- the files Docker reads ------------------------------------------------------------------


def _compose(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def _default(value: object) -> str:
    """The default of a compose interpolation such as `${NAME:-2}`, or the value itself."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def test_compose_wires_replicas_behind_nginx() -> None:
    services = _compose("docker-compose.yml")["services"]
    server, nginx = services["dynamerge"], services["nginx"]
    assert int(_default(server["deploy"]["replicas"])) >= 2
    assert "ports" not in server and "container_name" not in server  # replicas, not one box
    assert server["environment"]["DYNAMERGE_HOST"] == "0.0.0.0"
    assert "healthcheck.py" in " ".join(server["healthcheck"]["test"])
    assert nginx["depends_on"]["dynamerge"]["condition"] == "service_healthy"
    assert nginx["environment"]["DYNAMERGE_UPSTREAM"] == "dynamerge:8000"
    assert any(
        v.startswith("./deploy/nginx.conf.template:/etc/nginx/templates/")
        for v in nginx["volumes"]
    )
    # Docker's SIGKILL must not cut the drain short.
    grace = float(server["stop_grace_period"].removesuffix("s"))
    assert grace > float(_default(server["environment"]["DYNAMERGE_DRAIN_TIMEOUT_S"]))

    gpu = _compose("deploy/docker-compose.gpu.yml")["services"]["dynamerge"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_deployment_files_name_real_settings() -> None:
    """Every DYNAMERGE_* variable the image, compose and README set is a real setting."""
    known = {f"DYNAMERGE_{name.upper()}" for name in Settings.model_fields}
    # Read by compose itself (interpolation) or by the nginx template, not by the server.
    compose_only = {
        "DYNAMERGE_REPLICAS", "DYNAMERGE_HTTP_PORT", "DYNAMERGE_UPSTREAM",
        "DYNAMERGE_CUDA_BASE_IMAGE",
    }
    texts = {
        path: (REPO / path).read_text()
        for path in ("Dockerfile", "docker-compose.yml", "deploy/docker-compose.gpu.yml")
    }
    texts["README.md#deployment"] = (REPO / "README.md").read_text().partition(
        "\n## Deployment\n"
    )[2]
    assert texts["README.md#deployment"], "README.md has no Deployment section"
    for path, text in texts.items():
        used = set(re.findall(r"DYNAMERGE_[A-Z0-9_]*[A-Z0-9]", text))
        assert used - known - compose_only == set(), path


@needs_nginx
def test_no_live_replica_gives_the_json_error_envelope(tmp_path: Path) -> None:
    assert NGINX is not None
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]  # nothing listens there
    nginx = Nginx(NGINX, tmp_path / "nginx", free_port(), dead)
    nginx.start()
    try:
        client = OpenAI(base_url=f"{nginx.url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as failure:
            client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
    finally:
        nginx.stop()
    assert failure.value.status_code == 502
    assert failure.value.body["code"] == "bad_gateway"  # the client unwraps "error"
