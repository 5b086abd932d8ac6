"""deploy/k8s renders with `kubectl kustomize` for each overlay, and what it renders keeps the
contract the server offers: probe paths it serves, a grace period covering the drain, the
image's uid, real settings, selectors that reach the pods, one GPU per replica in the GPU
overlay. Schema validation and a real cluster are not covered here (see README)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.api.health import router as health_router
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed (.ci/run installs it)"
)


def render(overlay: str) -> dict[str, dict]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out) if doc}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request) -> tuple[str, dict[str, dict]]:
    return request.param, render(request.param)


def _container(objects: dict[str, dict]) -> dict:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_renders_every_object(rendered):
    _, objects = rendered
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget",
                            "PersistentVolumeClaim"}


def test_probes_use_paths_the_server_serves(rendered):
    _, objects = rendered
    container = _container(objects)
    served = {route.path for route in health_router.routes}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {container[p]["httpGet"]["path"] for p in
            ("readinessProbe", "livenessProbe", "startupProbe")} <= served
    startup = container["startupProbe"]
    # At least the image HEALTHCHECK's start period (180 s) for model load and warm-up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_grace_period_covers_prestop_and_drain(rendered):
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    env = {item["name"]: item["value"] for item in container["env"]}
    drain = float(env["DYNAMERGE_DRAIN_TIMEOUT_S"])
    sleep = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain
    known = {f"DYNAMERGE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known


def test_runs_as_the_image_uid_and_reaches_its_pods(rendered):
    _, objects = rendered
    pod_spec = objects["Deployment"]["spec"]["template"]
    security = pod_spec["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    labels = pod_spec["metadata"]["labels"]
    for selector in (objects["Service"]["spec"]["selector"],
                     objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     objects["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    volumes = {v["name"]: v for v in pod_spec["spec"]["volumes"]}
    claim = volumes["adapters"]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]


def test_gpu_only_in_the_gpu_overlay(rendered):
    overlay, objects = rendered
    limits = _container(objects)["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (1 if overlay == "gpu" else None)
