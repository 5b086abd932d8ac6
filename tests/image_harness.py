"""A private Docker engine and the two stand-ins the image build needs on a closed network.

tests/test_image.py builds the repository's Dockerfile with these. CI's machine reaches no
container registry and not torch's CPU index, so:
- the base image is a Debian bookworm `debootstrap` (python3, python3-venv, ca-certificates),
  `docker import`ed under the Dockerfile's default base tag (cached as a tarball between runs);
- torch's index is a PEP 503 index on 127.0.0.1 holding the local torch CPU wheel and its
  dependencies (pip's `--index-url` is exclusive, so the index must hold them all);
- the machine's package traffic passes a TLS-intercepting proxy: its CA certificates (Debian's
  local certificates folder) go into the build through the EXTRA_CA_CERTS build argument.
The engine is always our own `dockerd` (data-root, exec-root, socket and pidfile in a temp
folder, no bridge, no iptables: every build and container uses the host's network), so the
test never touches another engine's images and leaves nothing behind: `Engine.stop()` removes
every container, stops the daemon (and its containerd) and deletes its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from deploy_harness import REPO, _detach, _tail

BASE_TAG = "python:3.11-slim-bookworm"  # the Dockerfile's default BASE_IMAGE
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CA_DIR = Path("/usr/local/share/ca-certificates")
CACHE = Path(os.environ.get("DYNAMERGE_CACHE_DIR", Path.home() / ".cache" / "dynamerge"))
TORCH_REQUIREMENT = "torch==2.13.0"


class EngineUnavailable(RuntimeError):
    """No Docker engine can be had here; the message says why."""


def _run(argv: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def docker_cli() -> str | None:
    """Debian's client beside Debian's daemon (same API) first, else any on PATH."""
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return shutil.which("docker")


def dockerd_binary() -> str | None:
    return shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if os.access("/usr/sbin/dockerd", os.X_OK) else None
    )


def debootstrap_binary() -> str | None:
    return shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.access("/usr/sbin/debootstrap", os.X_OK) else None
    )


def unavailable_reason() -> str | None:
    """Why no engine can be started here (None: it can)."""
    if os.geteuid() != 0:
        return "starting dockerd needs root"
    if dockerd_binary() is None:
        return "dockerd is not installed (.ci/run installs Debian's docker.io and debootstrap)"
    if docker_cli() is None:
        return "no docker client (Debian's docker.io brings one)"
    if debootstrap_binary() is None and not base_tarball().exists():
        return "debootstrap is not installed and no cached base image tarball exists"
    return None


@dataclass
class Engine:
    """Our own dockerd, in the background, everything under `root`."""

    root: Path
    proc: subprocess.Popen | None = None
    cli: str = field(default_factory=lambda: docker_cli() or "docker")

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def start(self, timeout_s: float = 90) -> None:
        argv = [
            dockerd_binary() or "dockerd",
            "--storage-driver", "overlay2",
            "--iptables=false", "--bridge=none", "--ip-forward=false", "--ip-masq=false",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "dockerd.pid"),
            "--host", f"unix://{self.socket}",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_detach,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineUnavailable(
                    f"dockerd exited ({self.proc.returncode}) at start:\n{_tail(self.log_path)}"
                )
            if self.socket.exists() and self.docker("version", timeout_s=10).returncode == 0:
                return
            time.sleep(0.5)
        raise EngineUnavailable(f"dockerd not answering after {timeout_s} s:\n{self.log()}")

    def docker(self, *args: str, timeout_s: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return _run([self.cli, "-H", f"unix://{self.socket}", *args], timeout_s, **kwargs)

    def check(self, *args: str, timeout_s: float = 120, **kwargs) -> str:
        """Run a docker command; raise with its output unless it succeeded."""
        done = self.docker(*args, timeout_s=timeout_s, **kwargs)
        if done.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args)[:200]} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout.strip()

    def log(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> dict[str, float]:
        """Remove every container, stop dockerd and its containerd, delete `root`; returns
        the seconds each step took (the test reports them)."""
        took: dict[str, float] = {}
        clock = time.monotonic()

        def lap(step: str) -> None:
            nonlocal clock
            took[step] = round(time.monotonic() - clock, 1)
            clock = time.monotonic()

        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.docker("ps", "-aq", timeout_s=30).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout_s=120)
            lap("containers removed")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
            lap("dockerd stopped")
        # dockerd stops the containerd it started; after a SIGKILL it could not have.
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        # Mounts left by a daemon that did not shut down cleanly, deepest first.
        with contextlib.suppress(OSError):
            mounts = [
                line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                if line.split()[1].startswith(str(self.root))
            ]
            for mount in sorted(mounts, key=len, reverse=True):
                _run(["umount", "-l", mount], 30)
        # rm's C loop is much faster than shutil.rmtree on the image layers' many files;
        # --one-file-system keeps it out of any mount left behind.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            _run(["rm", "-rf", "--one-file-system", str(self.root)], 600)
        shutil.rmtree(self.root, ignore_errors=True)
        lap("data-root deleted")
        return took


def start_engine() -> Engine:
    # A short path: containerd's sockets live under the exec-root (108-byte socket paths).
    engine = Engine(Path(tempfile.mkdtemp(prefix="dm-docker-", dir="/tmp")))
    try:
        engine.start()
    except BaseException:
        engine.stop()
        raise
    return engine


def base_tarball() -> Path:
    return CACHE / "image-base" / "bookworm-minbase-python3.tar"


def import_base_image(engine: Engine, timeout_s: float = 900) -> None:
    """The stand-in for the base image, made once by debootstrap and cached as a tarball."""
    tarball = base_tarball()
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="dm-bootstrap-", dir=tarball.parent))
        try:
            done = _run(
                [
                    debootstrap_binary() or "debootstrap", "--variant=minbase",
                    "--include=python3,python3-venv,ca-certificates",
                    "bookworm", str(work / "root"), DEBIAN_MIRROR,
                ],
                timeout_s,
            )
            if done.returncode != 0:
                raise RuntimeError(f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr}")
            # Only the file system the image needs: no apt lists or package cache.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (work / "root" / junk).glob("*.deb"):
                    path.unlink()
            partial_tar = work / "root.tar"
            done = _run(["tar", "-C", str(work / "root"), "-cf", str(partial_tar), "."], 300)
            if done.returncode != 0:
                raise RuntimeError(f"tar failed: {done.stderr}")
            partial_tar.replace(tarball)  # atomic: a killed run leaves no half tarball
        finally:
            shutil.rmtree(work, ignore_errors=True)
    # An imported image has no config: give it what python:*-slim images set.
    engine.check(
        "import",
        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", "ENV LANG=C.UTF-8",
        "--change", 'CMD ["python3"]',
        str(tarball), BASE_TAG,
        timeout_s=300,
    )


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def build_wheelhouse(timeout_s: float = 600) -> Path:
    """torch's CPU wheel (the one on disk) and its dependencies at the lock's versions."""
    wheelhouse = CACHE / "image-wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    done = _run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
            "-c", str(REPO / ".ci" / "constraints.txt"), "-d", str(wheelhouse),
            TORCH_REQUIREMENT,
        ],
        timeout_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip download of torch's wheels failed:\n{done.stderr[-3000:]}")
    if not any("+cpu" in p.name for p in wheelhouse.glob("torch-*.whl")):
        raise RuntimeError(f"no torch CPU wheel in {wheelhouse}: {os.listdir(wheelhouse)}")
    return wheelhouse


class IndexServer:
    """A PEP 503 simple index of `wheelhouse` on 127.0.0.1, served from a thread."""

    def __init__(self, wheelhouse: Path, root: Path) -> None:
        projects: dict[str, list[Path]] = {}
        for wheel in sorted(wheelhouse.glob("*.whl")):
            projects.setdefault(_normalize(wheel.name.split("-")[0]), []).append(wheel)
        (root / "files").mkdir(parents=True, exist_ok=True)
        links = []
        for project, wheels in projects.items():
            anchors = []
            for wheel in wheels:
                target = root / "files" / wheel.name
                if not target.exists():
                    os.symlink(wheel, target)
                digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
                anchors.append(
                    f'<a href="../../files/{html.escape(wheel.name)}#sha256={digest}">'
                    f"{html.escape(wheel.name)}</a><br>"
                )
            page = root / "simple" / project / "index.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text("<!DOCTYPE html><html><body>" + "".join(anchors) + "</body></html>")
            links.append(f'<a href="{project}/">{project}</a><br>')
        (root / "simple" / "index.html").write_text(
            "<!DOCTYPE html><html><body>" + "".join(links) + "</body></html>"
        )
        handler = partial(_QuietHandler, directory=str(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.projects = sorted(projects)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/simple"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def extra_ca_certs() -> str:
    """The PEM text of the machine's added CAs (the proxy's among them), or ''."""
    if not CA_DIR.is_dir():
        return ""
    return "\n".join(p.read_text().strip() for p in sorted(CA_DIR.rglob("*.crt")))
