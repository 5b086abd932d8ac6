"""The Docker image, built from this checkout and run: the deployment users actually get.

Marker `image`; conftest.py runs these last. They start their own dockerd (Debian's docker.io,
which .ci/run installs), build the repository's Dockerfile with the stand-ins of
tests/image_harness.py (a debootstrapped base under the default base tag, a loopback PEP 503
index for torch's CPU wheel, the machine's CA passed as a build argument), and check what a
user relies on: the server gets ready and answers right through the official `openai` client,
runs as uid 10001, the HEALTHCHECK turns healthy, `docker stop` in the middle of a stream
lets it finish and exit 0, and two containers behind the repository's nginx template share
the load. Host networking and loopback ports only. Every container, the daemon and the index
server are stopped by the fixtures' finalizers, failed or not.

Where no engine can be had (not root, dockerd not installed) they skip with the reason,
except under CI (CI=true), where they fail: CI must build the image.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from deploy_harness import REPO, Nginx, free_port
from image_harness import (
    BASE_TAG,
    Engine,
    EngineUnavailable,
    IndexServer,
    build_wheelhouse,
    extra_ca_certs,
    import_base_image,
    start_engine,
    unavailable_reason,
)
from openai import OpenAI
from test_deploy import NGINX

pytestmark = pytest.mark.image

TAG = "dynamerge:image-test"
BUILD_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 300.0
HEALTHY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30  # the image's DYNAMERGE_DRAIN_TIMEOUT_S
UID = 10001
# The demo zoo's arithmetic adapter (tests/test_demo_zoo.py asks the engine the same).
QUESTION, ANSWER = "What is 47 plus 38?", "85"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must build the image, but: {reason}")
    pytest.skip(reason)


def _report(config: pytest.Config, line: str) -> None:
    """A line in the terminal output even when pytest captures output (CI logs read it)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line(f"[image] {line}")


@dataclass
class Built:
    engine: Engine
    build_s: float
    size_bytes: int
    root: Path


@pytest.fixture(scope="module")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    Built
]:
    reason = unavailable_reason()
    if reason:
        _unavailable(reason)
    root = tmp_path_factory.mktemp("image")
    try:
        engine = start_engine()
    except EngineUnavailable as exc:
        _unavailable(str(exc))
    index = None
    try:
        phase = time.monotonic()
        import_base_image(engine)
        index = IndexServer(build_wheelhouse(), root / "index")
        _report(
            request.config,
            f"base image imported and torch index served in "
            f"{time.monotonic() - phase:.0f} s",
        )
        assert "torch" in index.projects, index.projects
        build_log = root / "build.log"
        argv = [
            "build", "--network", "host", "--tag", TAG,
            "--build-arg", f"TORCH_INDEX_URL={index.url}",
        ]
        ca = extra_ca_certs()
        if ca:
            argv += ["--build-arg", f"EXTRA_CA_CERTS={ca}"]
        start = time.monotonic()
        done = engine.docker(
            *argv, str(REPO), timeout_s=BUILD_TIMEOUT_S, env={**os.environ, "DOCKER_BUILDKIT": "0"}
        )
        build_s = time.monotonic() - start
        build_log.write_text(done.stdout + done.stderr)
        assert done.returncode == 0, (
            f"docker build failed ({done.returncode}) after {build_s:.0f} s; log tail:\n"
            f"{(done.stdout + done.stderr)[-6000:]}"
        )
        size = int(engine.check("image", "inspect", "--format", "{{.Size}}", TAG))
        _report(
            request.config,
            f"image built in {build_s:.0f} s, {size / 1e9:.2f} GB (base: {BASE_TAG} stand-in)",
        )
        yield Built(engine, build_s, size, root)
    finally:
        start = time.monotonic()
        if index is not None:
            index.stop()
        took = engine.stop()
        _report(
            request.config,
            f"index and engine stopped in {time.monotonic() - start:.0f} s: {took}",
        )


@dataclass
class Container:
    engine: Engine
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, base_url: str | None = None) -> OpenAI:
        return OpenAI(
            base_url=f"{base_url or self.url}/v1", api_key="unused", max_retries=0,
            timeout=openai.Timeout(120, connect=5),
        )

    def state(self) -> dict:
        return json.loads(self.engine.check("inspect", "--format", "{{json .State}}", self.name))

    def logs(self) -> str:
        done = self.engine.docker("logs", "--tail", "60", self.name, timeout_s=30)
        return f"--- {self.name} ---\n{done.stdout[-4000:]}{done.stderr[-4000:]}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"{self.name} exited before it was ready:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not ready after {timeout_s} s:\n{self.logs()}")


def _run_container(engine: Engine, name: str) -> Container:
    port = free_port()
    # Loopback only: the host network, the server bound to 127.0.0.1 on a free port.
    engine.check(
        "run", "--detach", "--name", name, "--network", "host",
        "--env", f"DYNAMERGE_PORT={port}", "--env", "DYNAMERGE_HOST=127.0.0.1", TAG,
    )
    return Container(engine, name, port)


@pytest.fixture(scope="module")
def replicas(built: Built, request: pytest.FixtureRequest) -> Iterator[list[Container]]:
    """Two containers of the image, both ready (removed again by the engine's stop too)."""
    started: list[Container] = []
    try:
        for name in ("dm-image-a", "dm-image-b"):
            started.append(_run_container(built.engine, name))
        start = time.monotonic()
        for container in started:
            container.wait_ready(READY_TIMEOUT_S)
        _report(request.config, f"two containers ready in {time.monotonic() - start:.0f} s")
        yield started
    finally:
        start = time.monotonic()
        for container in started:
            built.engine.docker("rm", "--force", container.name, timeout_s=60)
        _report(request.config, f"containers removed in {time.monotonic() - start:.0f} s")


def _ask(client: OpenAI, question: str = QUESTION) -> str:
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": question}],
        max_tokens=24, temperature=0,
    )
    return (completion.choices[0].message.content or "").strip()


def test_container_answers_runs_unprivileged_and_turns_healthy(
    replicas: list[Container],
) -> None:
    container = replicas[0]
    assert _ask(container.client()) == ANSWER, container.logs()

    # The server process itself (not only `docker exec`'s default user) runs as 10001.
    pid = container.state()["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(UID)}, uids
    assert container.engine.check("exec", container.name, "id", "-u") == str(UID)

    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    health = container.state()["Health"]
    while health["Status"] != "healthy" and time.monotonic() < deadline:
        assert health["Status"] in ("starting", "unhealthy"), health
        time.sleep(2)
        health = container.state()["Health"]
    assert health["Status"] == "healthy", (health, container.logs())


@pytest.fixture(scope="module")
def nginx(
    replicas: list[Container],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Nginx]:
    if NGINX is None:
        _unavailable("nginx is not installed (.ci/run installs Debian's nginx-light)")
    proxy = Nginx(
        NGINX, tmp_path_factory.mktemp("image-nginx"), free_port(),
        [c.address for c in replicas],
    )
    try:
        proxy.start()
        yield proxy
    finally:
        start = time.monotonic()
        proxy.stop()
        _report(request.config, f"nginx stopped in {time.monotonic() - start:.0f} s")


def test_two_containers_behind_nginx_share_the_load(
    replicas: list[Container], nginx: Nginx
) -> None:
    client = replicas[0].client(nginx.url)
    answers: list[str] = []
    errors: list[str] = []

    def worker() -> None:
        for _ in range(3):
            try:
                answers.append(_ask(client))
            except Exception as exc:  # recorded for the assertion below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "requests through nginx did not finish"
    assert errors == [], errors
    assert answers == [ANSWER] * 12, answers
    served = [e for e in nginx.access_log() if "/v1/chat/completions" in e.request]
    by_replica = {c.address: 0 for c in replicas}
    for entry in served:
        assert entry.status == 200, entry
        by_replica[entry.upstreams[-1]] += 1
    # least_conn with four clients over two replicas: neither may be left idle.
    assert min(by_replica.values()) >= 3, by_replica


def test_docker_stop_mid_stream_drains_to_exit_0(
    replicas: list[Container], nginx: Nginx
) -> None:
    draining, other = replicas
    stream = draining.client().chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=160, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)  # the stream is under way
    stopper_result: dict[str, object] = {}

    def stop() -> None:
        start = time.monotonic()
        stopper_result["done"] = draining.engine.docker(
            "stop", "--time", str(DRAIN_TIMEOUT_S + 30), draining.name, timeout_s=120
        )
        stopper_result["seconds"] = time.monotonic() - start

    sent_at = time.monotonic()
    stopper = threading.Thread(target=stop)
    stopper.start()
    pieces, finish, after_sigterm = [first], None, 0
    for chunk in chunks:
        pieces.append(chunk)
        if time.monotonic() > sent_at + 0.5:
            after_sigterm += 1
        if chunk.choices and chunk.choices[0].finish_reason is not None:
            finish = chunk.choices[0].finish_reason
    stopper.join(timeout=150)
    assert not stopper.is_alive(), "docker stop did not return"
    assert finish == "length", (finish, draining.logs())
    assert after_sigterm > 0, "the stream ended before SIGTERM reached it: nothing was drained"
    state = draining.state()
    assert not state["Running"]
    # 0: it finished its drain; 137 would be docker's SIGKILL after the grace period.
    assert state["ExitCode"] == 0, (state, stopper_result, draining.logs())
    # The other replica still answers through nginx (a failed try moves to the next one).
    assert _ask(other.client(nginx.url)) == ANSWER
