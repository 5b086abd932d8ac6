"""The compose deployment on loopback: dynamerge replicas and nginx as plain processes.

tests/test_deploy.py drives these; they run the repository's own nginx template, so what the
tests prove holds for the file docker-compose.yml mounts. Every wait is bounded, and every
process started here is stopped by `stop()` (SIGKILL as the last resort).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO / "deploy" / "nginx.conf.template"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"
UPSTREAM_PLACEHOLDER = "${DYNAMERGE_UPSTREAM}"
LISTEN_PLACEHOLDER = "${NGINX_LISTEN}"


def _detach() -> None:
    """In the child before exec: its own session, and death with the parent (Linux).

    Its own session keeps a signal meant for one process away from pytest and the others;
    the parent-death signal makes the kernel kill it if pytest itself dies (a CI timeout), so
    no finalizer is needed to leave no server behind.
    """
    os.setsid()
    # Not Linux (no prctl): the fixtures' finalizers still stop it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_nginx_conf(template: str, upstreams: list[str], listen: str) -> str:
    """The template with one `server` line per upstream, as envsubst plus DNS would give.

    Under compose one line names the service and DNS expands it to every replica; loopback
    replicas differ by port, so the line is repeated instead, with its parameters unchanged.
    """
    out = []
    for line in template.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            out.append(line)
        elif UPSTREAM_PLACEHOLDER in line:
            out.extend(line.replace(UPSTREAM_PLACEHOLDER, upstream) for upstream in upstreams)
        else:
            out.append(line.replace(LISTEN_PLACEHOLDER, listen))
    text = "".join(out)
    leftover = [
        line for line in text.splitlines() if "${" in line and not line.lstrip().startswith("#")
    ]
    if leftover:
        raise ValueError(f"unrendered placeholders in the nginx template: {leftover}")
    return text


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Replica:
    """One `dynamerge serve` process on a loopback port."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        command = Path(sys.executable).with_name("dynamerge")
        argv = [str(command), "serve"] if command.exists() else [
            sys.executable, "-m", "app.cli", "serve"
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_detach,
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"replica {self.name} exited ({self.proc and self.proc.returncode}) before "
                    f"it was ready; log:\n{self.log()}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"replica {self.name} not ready after {timeout_s} s; log:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout_s: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        if self.wait_exit(15) is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return _tail(self.log_path)

    def running_requests(self) -> float | None:
        """Requests this replica is working on, from its /metrics; None when not exported."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        total, seen = 0.0, False
        for name in ("dynamerge_running_requests", "dynamerge_queue_depth"):
            match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
            if match:
                total, seen = total + float(match.group(1)), True
        return total if seen else None


@dataclass(frozen=True)
class AccessEntry:
    """One request as nginx logged it once it finished."""

    end: float  # wall clock (time.time()) when nginx finished the response
    duration_s: float
    status: int
    upstreams: tuple[str, ...]  # every replica tried, in order; the last one answered
    request: str

    @property
    def start(self) -> float:
        return self.end - self.duration_s


_ACCESS_FORMAT = '$msec $request_time $status "$upstream_addr" "$request"'
_ACCESS_LINE = re.compile(r'^(\S+) (\S+) (\d+) "([^"]*)" "([^"]*)"$')


@dataclass
class Nginx:
    """nginx with the repository's template, in the foreground, everything under `prefix`."""

    binary: str
    prefix: Path
    port: int
    upstreams: list[str]
    proc: subprocess.Popen | None = None
    conf_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf_path = self.prefix / "nginx.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        site = render_nginx_conf(
            NGINX_TEMPLATE.read_text(), self.upstreams, f"127.0.0.1:{self.port}"
        )
        (self.prefix / "dynamerge.conf").write_text(site)
        # Temp paths only for the modules this build has: naming one it lacks is an error,
        # and leaving one out makes nginx create the packaged default under /var.
        version = subprocess.run(
            [self.binary, "-V"], capture_output=True, text=True, timeout=10, check=True
        ).stderr
        temp_paths = "".join(
            f"    {module}_temp_path {self.prefix / module};\n"
            for module in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            if module == "client_body" or f"--without-http_{module}_module" not in version
        )
        # As root, workers would switch to an unprivileged user that cannot reach the tmp
        # prefix (pytest makes it 0700).
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf_path.write_text(
            f"{user}daemon off;\n"
            # One process with no workers: the parent-death signal then covers all of nginx.
            "master_process off;\n"
            f"pid {self.prefix / 'nginx.pid'};\n"
            f"error_log {self.prefix / 'error.log'} info;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            f"    log_format upstreams '{_ACCESS_FORMAT}';\n"
            f"    access_log {self.prefix / 'access.log'} upstreams;\n"
            f"{temp_paths}"
            f"    include {self.prefix / 'dynamerge.conf'};\n"
            "}\n"
        )

    def _argv(self, *extra: str) -> list[str]:
        return [
            self.binary, "-e", str(self.prefix / "error.log"), "-p", str(self.prefix),
            "-c", str(self.conf_path), *extra,
        ]

    def start(self, timeout_s: float = 20) -> None:
        self.write_conf()
        check = subprocess.run(self._argv("-t"), capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        with (self.prefix / "stdout.log").open("ab") as log:
            self.proc = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_detach
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.error_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"nginx not listening after {timeout_s} s: {self.error_log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def error_log(self) -> str:
        return _tail(self.prefix / "error.log")

    def access_log(self) -> list[AccessEntry]:
        entries = []
        path = self.prefix / "access.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            match = _ACCESS_LINE.match(line)
            if match is None:
                continue
            end, duration, status, upstreams, request = match.groups()
            # $upstream_addr separates tries by ", " (and groups by " : ").
            tried = tuple(u.strip() for u in re.split(r"[,:] ", upstreams) if u.strip() != "-")
            entries.append(AccessEntry(float(end), float(duration), int(status), tried, request))
        return entries


@dataclass
class Outcome:
    """One client request as the client saw it."""

    index: int
    start: float  # time.time()
    end: float
    ok: bool
    error: str = ""


class Load:
    """`send(i)` called from `workers` threads until stopped, a request count or a time limit.

    An exception raised by `send` is a failed request, recorded in `outcomes`.
    """

    def __init__(
        self, send: Callable[[int], None], workers: int, max_requests: int, max_seconds: float
    ) -> None:
        self._send = send
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._indices = iter(range(max_requests))
        self._max_seconds = max_seconds
        self._deadline = 0.0
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        self.outcomes: list[Outcome] = []

    def start(self) -> Load:
        self._deadline = time.monotonic() + self._max_seconds
        for thread in self._threads:
            thread.start()
        return self

    def _work(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                index = next(self._indices, None)
            if index is None:
                return
            start = time.time()
            try:
                self._send(index)
                outcome = Outcome(index, start, time.time(), True)
            except Exception as exc:  # a failed request is data for the test, not a crash
                outcome = Outcome(index, start, time.time(), False, repr(exc))
            with self._lock:
                self.outcomes.append(outcome)

    def finish(self, timeout_s: float, stop: bool = True) -> list[Outcome]:
        """Wait (bounded) for the requests in flight; with `stop`, send no new ones, else
        run until the request count or the time limit."""
        if stop:
            self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            raise TimeoutError(f"requests still in flight {timeout_s} s after the load stopped")
        with self._lock:
            return list(self.outcomes)
