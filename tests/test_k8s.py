"""deploy/k8s renders with `kubectl kustomize` for each overlay and add-on, and what it renders
keeps the contract the server offers: probe paths it serves, a grace period covering the drain,
the image's uid, real settings, selectors that reach the pods, one GPU per replica in the GPU
overlay. Every object validates against the Kubernetes JSON schemas of a current release
(kubernetes-validate, offline) or against the vendored CRD of its kind (tests/data/crds), and
the metrics the autoscaler and the endpoint picker read are what a live server's /metrics
serves. A real cluster, KEDA, Prometheus and the endpoint picker itself are not run here."""

import copy
import functools
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.api.health import router as health_router
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed (.ci/run installs it)"
)


def render_docs(path: str) -> list[dict]:
    """`kubectl kustomize deploy/k8s/<path>`: the objects that `kubectl apply -k` would send."""
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy/k8s" / path)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render(overlay: str) -> dict[str, dict]:
    """One overlay's objects by kind (each kind appears once)."""
    docs = render_docs(f"overlays/{overlay}")
    objects = {doc["kind"]: doc for doc in docs}
    assert len(objects) == len(docs)
    return objects


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


# --- add-ons: autoscaling (KEDA + ServiceMonitor) and the inference gateway ----------------

ADDONS = {
    "autoscaling": {"ServiceMonitor", "ScaledObject"},
    "inference-gateway": {"InferencePool", "HTTPRoute", "Deployment", "Service", "ConfigMap",
                          "ServiceAccount", "Role", "RoleBinding"},
}
CRDS = ROOT / "tests/data/crds"
K8S_VERSION = "1.37"  # the newest release kubernetes-validate (pinned in the lock) ships


def render_addon(name: str) -> dict[str, dict]:
    docs = render_docs(name)
    objects = {doc["kind"]: doc for doc in docs}
    assert len(objects) == len(docs), "one object per kind in an add-on"
    return objects


@pytest.fixture(scope="module")
def everything() -> dict[str, dict[str, dict]]:
    """Every rendered object: the two overlays and the add-ons, by kustomization and kind."""
    sets = {f"overlays/{o}": render(o) for o in ("cpu", "gpu")}
    sets.update({name: render_addon(name) for name in ADDONS})
    return sets


def _strict(schema: dict) -> dict:
    """A CRD schema in which an object with declared properties accepts no others: the API
    server prunes unknown fields silently, so without this a misspelt field would pass."""
    if not isinstance(schema, dict):
        return schema
    out = {key: value for key, value in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if ("additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict openAPIV3Schema, from every vendored CRD."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def validation_errors(doc: dict) -> list[str]:
    """Why `doc` fails its schema (empty when it validates)."""
    crd = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        validator = jsonschema.Draft7Validator(crd)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [str(error)]
    return []


def test_addons_render_their_objects(everything):
    for name, kinds in ADDONS.items():
        assert set(everything[name]) == kinds


def test_every_object_validates_against_its_schema(everything):
    vendored = {kind for _, kind in crd_schemas()}
    assert vendored == {"InferencePool", "HTTPRoute", "ScaledObject", "ServiceMonitor"}
    for name, objects in everything.items():
        for kind, doc in objects.items():
            assert validation_errors(doc) == [], f"{name}: {kind}"


def test_validation_rejects_what_a_cluster_would_not_take(everything):
    """The validators bite: a misspelt field, a wrong type, a value outside an enum."""
    deployment = copy.deepcopy(everything["overlays/cpu"]["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert validation_errors(deployment)
    pool = copy.deepcopy(everything["inference-gateway"]["InferencePool"])
    pool["spec"]["targetPorts"][0]["number"] = "8000"
    assert validation_errors(pool)
    pool = copy.deepcopy(everything["inference-gateway"]["InferencePool"])
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Open"
    assert validation_errors(pool)
    scaled = copy.deepcopy(everything["autoscaling"]["ScaledObject"])
    scaled["spec"]["scaleTargetRef"]["nmae"] = scaled["spec"]["scaleTargetRef"].pop("name")
    assert validation_errors(scaled)
    monitor = copy.deepcopy(everything["autoscaling"]["ServiceMonitor"])
    monitor["spec"]["endpoints"][0]["interval"] = "often"
    assert validation_errors(monitor)


def _base(everything) -> dict[str, dict]:
    return everything["overlays/cpu"]


def test_autoscaling_reaches_the_base(everything):
    base = _base(everything)
    scaled, monitor = (everything["autoscaling"][k] for k in ("ScaledObject", "ServiceMonitor"))
    assert scaled["spec"]["scaleTargetRef"]["name"] == base["Deployment"]["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # The query selects the series that the ServiceMonitor's scrape of this Service labels.
    assert f'service="{base["Service"]["metadata"]["name"]}"' in trigger["metadata"]["query"]
    # At least two replicas, so that the disruption budget always leaves one serving.
    assert scaled["spec"]["minReplicaCount"] >= 1 + base["PodDisruptionBudget"]["spec"][
        "maxUnavailable"]
    service = base["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    served = {route.path for route in health_router.routes}
    assert endpoint["path"] in served


def test_inference_pool_selects_the_servers_and_its_picker(everything):
    base, gateway = _base(everything), everything["inference-gateway"]
    pool = gateway["InferencePool"]["spec"]
    server = base["Deployment"]["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= server["metadata"]["labels"].items()
    (container,) = server["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [ports["http"]]
    assert int(env["DYNAMERGE_PORT"]) == ports["http"]
    # The picker's own pods are not in the pool, nor behind the servers' Service.
    picker = gateway["Deployment"]["spec"]["template"]
    picker_labels = picker["metadata"]["labels"].items()
    assert not pool["selector"]["matchLabels"].items() <= picker_labels
    assert not base["Service"]["spec"]["selector"].items() <= picker_labels
    ref = pool["endpointPickerRef"]
    service = gateway["Service"]
    assert ref["name"] == service["metadata"]["name"]
    assert ref["port"]["number"] in {port["port"] for port in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= picker_labels
    (route_rule,) = gateway["HTTPRoute"]["spec"]["rules"]
    assert route_rule["backendRefs"][0]["name"] == gateway["InferencePool"]["metadata"]["name"]
    # The picker reads the generated ConfigMap's file and waits as long as a server drains.
    (epp,) = picker["spec"]["containers"]
    config_path = epp["args"][epp["args"].index("--config-file") + 1]
    (mount,) = epp["volumeMounts"]
    (volume,) = picker["spec"]["volumes"]
    assert volume["configMap"]["name"] == gateway["ConfigMap"]["metadata"]["name"]
    assert config_path == f"{mount['mountPath']}/epp-config.yaml"
    assert "epp-config.yaml" in gateway["ConfigMap"]["data"]
    assert (picker["spec"]["terminationGracePeriodSeconds"]
            >= server["spec"]["terminationGracePeriodSeconds"])
    assert epp["args"][epp["args"].index("--pool-name") + 1] == (
        gateway["InferencePool"]["metadata"]["name"])


# The EndpointPickerConfig is a file, not a CRD: its shape, from the v1.5.0 Go types
# (apix/config/v1alpha1/endpointpickerconfig_types.go), and the plugin types that release
# registers (cmd/epp/runner/runner.go) among those this configuration may use.
_REF = {"type": "object", "required": ["pluginRef"], "additionalProperties": False,
        "properties": {"pluginRef": {"type": "string", "minLength": 1}}}
EPP_CONFIG_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "plugins", "schedulingProfiles"],
    "properties": {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        "featureGates": {"type": "array", "items": {"type": "string"}},
        "plugins": {"type": "array", "items": {
            "type": "object", "required": ["type"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "type": {"type": "string"},
                           "parameters": {"type": "object"}}}},
        "schedulingProfiles": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "plugins"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "plugins": {"type": "array", "items": {
                "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                "properties": {"pluginRef": {"type": "string"},
                               "weight": {"type": "number", "exclusiveMinimum": 0}}}}}}},
        "dataLayer": {"type": "object", "additionalProperties": False, "properties": {
            "sources": {"type": "array", "items": {
                "type": "object", "required": ["pluginRef"], "additionalProperties": False,
                "properties": {"pluginRef": {"type": "string"},
                               "extractors": {"type": "array", "items": _REF}}}}}},
        "saturationDetector": _REF, "parser": _REF, "flowControl": {"type": "object"},
    },
}
EPP_V1_5_PLUGIN_TYPES = {
    "lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer",
    "prefix-cache-scorer", "running-requests-size-scorer", "token-load-scorer",
    "max-score-picker", "random-picker", "weighted-random-picker", "single-profile-handler",
    "metrics-data-source", "core-metrics-extractor", "openai-parser",
}


def epp_config(everything) -> dict:
    return yaml.safe_load(everything["inference-gateway"]["ConfigMap"]["data"]["epp-config.yaml"])


def epp_engine(config: dict) -> dict:
    """The core-metrics-extractor's metric specs for our pods (its default engine)."""
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    params = extractor["parameters"]
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"]]
    assert engine["name"] != "default"  # reserved by the extractor's registry
    return engine


def test_endpoint_picker_config_is_well_formed(everything):
    config = epp_config(everything)
    jsonschema.validate(config, EPP_CONFIG_SCHEMA)
    names = {p.get("name", p["type"]) for p in config["plugins"]}
    assert len(names) == len(config["plugins"])
    assert {p["type"] for p in config["plugins"]} <= EPP_V1_5_PLUGIN_TYPES
    refs = [ref["pluginRef"] for profile in config["schedulingProfiles"]
            for ref in profile["plugins"]]
    refs += [s["pluginRef"] for s in config["dataLayer"]["sources"]]
    refs += [e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]]
    assert set(refs) <= names
    # The scorers the issue names, all in the profile that schedules.
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= set(refs)
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    (monitor_endpoint,) = everything["autoscaling"]["ServiceMonitor"]["spec"]["endpoints"]
    assert source["parameters"]["path"] == monitor_endpoint["path"] == "/metrics"
    assert epp_engine(config)["loraSpec"] == "vllm:lora_requests_info"


# --- what the manifests read is what the server serves ---------------------------------------

_SPEC = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?$")
_QUERY_METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")


def _spec(spec: str) -> tuple[str, dict[str, str]]:
    """The EPP's metric spec syntax, `name` or `name{label=value,...}`."""
    match = _SPEC.match(spec)
    assert match, spec
    labels = dict(pair.split("=", 1) for pair in filter(None, (match["labels"] or "").split(",")))
    return match["name"], {k.strip(): v.strip().strip('"') for k, v in labels.items()}


@pytest.fixture(scope="module")
def served(micro_engine) -> tuple[dict, str]:
    """A live server's /metrics (parsed) after one request that names an adapter."""
    from server import LiveServer

    from app.main import create_app

    adapter = micro_engine.adapter_ids()[0]
    with LiveServer(create_app(micro_engine.settings, micro_engine)) as live, \
            live.client() as http:
        answer = http.post("/v1/chat/completions", json={
            "model": adapter, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    return families, adapter


def test_autoscaler_query_reads_served_gauges(everything, served):
    families, _ = served
    (trigger,) = everything["autoscaling"]["ScaledObject"]["spec"]["triggers"]
    names = _QUERY_METRIC.findall(trigger["metadata"]["query"])
    assert names == ["vllm:num_requests_waiting"]
    for name in names:
        assert families[name].type == "gauge"


def test_endpoint_picker_reads_served_metrics(everything, served, micro_engine):
    families, adapter = served
    engine = epp_engine(epp_config(everything))
    specs = {key: value for key, value in engine.items() if key.endswith("Spec") and value}
    assert set(specs) == {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec",
                          "loraSpec"}
    for key, spec in specs.items():
        name, labels = _spec(spec)
        assert name in families, f"{key}: {name} is not served"
        family = families[name]
        assert family.type == "gauge", key
        assert [s for s in family.samples if labels.items() <= s.labels.items()], key
    (queue,) = families[_spec(specs["queuedRequestsSpec"])[0]].samples
    (running,) = families[_spec(specs["runningRequestsSpec"])[0]].samples
    assert queue.value >= 0 and running.value >= 0
    (usage,) = families[_spec(specs["kvUsageSpec"])[0]].samples
    assert 0 <= usage.value <= 1
    # LoRA affinity: the labels the picker parses, max_lora an integer (the device slots),
    # the value the sample's time (the picker keeps the newest), the requested adapter listed
    # as loaded (it stays in its device slot after the request).
    (lora,) = families[_spec(specs["loraSpec"])[0]].samples
    assert set(lora.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert int(lora.labels["max_lora"]) == micro_engine.settings.max_adapters
    assert abs(lora.value - time.time()) < 300
    running_adapters = lora.labels["running_lora_adapters"].split(",")
    assert adapter in running_adapters
    assert len(running_adapters) <= micro_engine.settings.max_adapters
    assert lora.labels["waiting_lora_adapters"] == ""


# What a loaded demo replica holds before any budget fills (VmHWM 1.2 GiB measured after
# Engine.load on the demo model and zoo; README: Kubernetes, sizing), rounded up.
LOADED_BYTES = 1.3 * 2**30
BUDGETS = ("kv_pool_bytes", "prefix_cache_bytes", "host_adapter_bytes", "merge_cache_bytes",
           "merge_prepared_bytes", "merge_set_bytes")


def _quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def test_memory_budgets_fit_the_limit(rendered):
    """Every memory budget is set (none left to rules that read the node's memory) and
    together with the loaded model they fit the container's limit."""
    _, objects = rendered
    container = _container(objects)
    env = {item["name"]: item["value"] for item in container["env"]}
    budgets = {name: int(env[f"DYNAMERGE_{name.upper()}"]) for name in BUDGETS}
    for name, value in budgets.items():
        Settings(**{name: value})  # a valid setting
    limit = _quantity_bytes(container["resources"]["limits"]["memory"])
    assert sum(budgets.values()) + LOADED_BYTES <= limit
    assert _quantity_bytes(container["resources"]["requests"]["memory"]) <= limit
