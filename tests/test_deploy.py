"""The Kubernetes manifests in deploy/kubernetes, checked offline.

Every overlay is rendered (``tests/manifests.py``) and each resource validated
against the Kubernetes API schemas bundled with ``kubernetes-validate`` (no
cluster, no network). Then the manifests are checked against what they describe:
the probes and ports against the image (deploy/container/Containerfile), the
image names against what ``make container`` tags, the ``SERVING_*`` variables
against the settings the service reads (service/settings.py), the grace period
against the drain time, and the thread count against the CPU limit. API keys are on
everywhere: the key file the service reads is the one the image names, inside a
read-only mount of the whole Secret ``serving-api-keys`` (not a subPath, so that a
changed Secret reaches the running pods), and every probe asks an open path.

The KServe InferenceService (deploy/kubernetes/kserve) is built into the KServe
SDK's models by the SDK's own Python (``make kserve-venv``: its pins conflict with
the service's), which must give back the same manifest, and checked like the rest.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.api_keys import METRICS_PATH, OPEN_PATHS
from service.settings import PREFIX, Settings
from tests.manifests import (
    KUBERNETES_DIR,
    commented_alternative,
    containers,
    find,
    read_env_file,
    referenced_files,
    render,
)
from tests.tool_envs import tool_python

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINER_DIR = REPO_ROOT / "deploy" / "container"
OVERLAYS = {"cpu": KUBERNETES_DIR / "overlays" / "cpu", "gpu": KUBERNETES_DIR / "overlays" / "gpu"}
KSERVE_DIR = KUBERNETES_DIR / "kserve"
# Optional (the Prometheus operator's PodMonitor and PrometheusRule), for an overlay's
# `components:`; the overlays here apply without it.
MONITORING_DIR = KUBERNETES_DIR / "components" / "monitoring"
# The oldest Kubernetes release still maintained upstream, and the newest known here.
KUBERNETES_VERSIONS = ("1.32.0", kubernetes_validate.utils.latest_version())
PROBE_PATHS = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
# The Secret that holds the key file, and its key (docs/deploy.md, API keys).
KEYS_SECRET, KEYS_SECRET_KEY = "serving-api-keys", "api-keys"
KEYS_VARIABLE = f"{PREFIX}API_KEYS_FILE"
DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(OVERLAYS[request.param])


def deployment(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return find(resources, "Deployment", "digit-sentiment-serving")


def serving_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = containers(resources)
    return container


def settings_env(resources: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container gets from its ConfigMaps."""
    container = serving_container(resources)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def containerfile_instructions(name: str) -> list[str]:
    """The arguments of the runtime image's ``name`` instructions (continuations joined)."""
    text = (CONTAINER_DIR / "Containerfile").read_text().replace("\\\n", " ")
    # The runtime image is the last stage.
    last_stage = re.split(r"^FROM .*$", text, flags=re.MULTILINE)[-1]
    found = re.findall(rf"^{name} +(.+)$", last_stage, flags=re.MULTILINE)
    assert found, f"no {name} in deploy/container/Containerfile"
    return found


def containerfile_instruction(name: str) -> str:
    """The arguments of the runtime image's last ``name`` instruction."""
    return containerfile_instructions(name)[-1]


def image_env() -> dict[str, str]:
    """The environment the runtime image sets (its ``ENV KEY=VALUE ...`` instructions)."""
    env: dict[str, str] = {}
    for arguments in containerfile_instructions("ENV"):
        for word in shlex.split(arguments):
            key, sep, value = word.partition("=")
            assert sep, f"ENV {arguments}: write KEY=VALUE"
            env[key] = value
    return env


def image_keys_file() -> str:
    """Where the image expects its key file: every manifest must mount it there."""
    path = image_env().get(KEYS_VARIABLE)
    assert path, f"the image does not set {KEYS_VARIABLE}: it would serve every route open"
    return path


def container_env(container: dict[str, Any], configmaps: dict[str, str]) -> dict[str, str]:
    """What the container's process sees: the image's environment, then the ConfigMaps'
    (``envFrom``), then the container's own ``env``, each over the one before."""
    env = {**image_env(), **configmaps}
    for variable in container.get("env", []):
        assert "value" in variable, f"{variable['name']}: only plain values are checked here"
        env[variable["name"]] = variable["value"]
    return env


def check_keys_from_the_secret(
    pod: dict[str, Any], container: dict[str, Any], configmaps: dict[str, str]
) -> str:
    """Fails unless the key file the service reads is the image's, in a read-only,
    whole (not subPath) mount of the Secret's key, which must exist for the pod to
    start and be readable by the service's user; gives the file's path."""
    path = container_env(container, configmaps).get(KEYS_VARIABLE)
    assert path, f"{KEYS_VARIABLE} is not set: every route would be open"
    assert path == image_keys_file(), "not the path the image and the documents name"
    file = PurePosixPath(path)
    mounts = [m for m in container.get("volumeMounts", []) if file.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{path} is in {len(mounts)} mounts, not one"
    (mount,) = mounts
    assert mount.get("readOnly") is True, "the key file must be mounted read-only"
    # A subPath mount is a copy made at the start: the kubelet never updates it.
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath gets no updates"
    volumes = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
    assert len(volumes) == 1, f"no volume {mount['name']}"
    secret = volumes[0].get("secret")
    assert secret is not None, f"volume {mount['name']} is not a Secret"
    assert secret["secretName"] == KEYS_SECRET
    # An optional Secret that is missing gives an empty directory, and the service
    # then refuses to start; not optional, the pod waits for it with a clear event.
    assert secret.get("optional", False) is False, "the Secret must not be optional"
    name = str(file.relative_to(mount["mountPath"]))
    if "items" in secret:
        items = [item for item in secret["items"] if item["path"] == name]
        assert len(items) == 1 and items[0]["key"] == KEYS_SECRET_KEY, secret["items"]
        mode = items[0].get("mode", secret.get("defaultMode", 0o644))
    else:
        assert name == KEYS_SECRET_KEY, f"{path}: the Secret's key {name} is not {KEYS_SECRET_KEY}"
        mode = secret.get("defaultMode", 0o644)
    # The kubelet writes the files as root; with an fsGroup they get that group, which
    # every container of the pod is in, and group read. Otherwise "other" must read.
    user = container.get("securityContext", {}).get(
        "runAsUser", pod.get("securityContext", {}).get("runAsUser")
    )
    readable = user == 0 or "fsGroup" in pod.get("securityContext", {}) or mode & 0o004
    assert readable, f"mode {mode:o}: the service's user (uid {user}) cannot read the key file"
    return path


def probe_paths(container: dict[str, Any]) -> dict[str, str]:
    return {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        if "httpGet" in container.get(probe, {})
    }


def check_probes_need_no_key(container: dict[str, Any]) -> None:
    """Fails unless every probe asks a path the service answers without a key."""
    paths = probe_paths(container)
    assert paths, "no HTTP probes"
    closed = {probe: path for probe, path in paths.items() if path not in OPEN_PATHS}
    assert not closed, f"probes on paths that need an API key (401): {closed}"


class RecordingEnv(Mapping[str, str]):
    """An environment that records which variables are looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return self.values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_every_manifest_validates_against_the_kubernetes_schemas(overlay):
    _, resources = overlay
    kinds = sorted(resource["kind"] for resource in resources)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    for version in KUBERNETES_VERSIONS:
        for resource in resources:
            kubernetes_validate.validate(resource, version, strict=True)


def test_the_validation_catches_a_broken_manifest(overlay):
    _, resources = overlay
    broken = deployment(resources)
    broken = {**broken, "spec": {**broken["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_file_in_deploy_kubernetes_is_used_by_an_overlay():
    """Or by the optional monitoring component."""
    used = set().union(
        *(referenced_files(path) for path in [*OVERLAYS.values(), KSERVE_DIR, MONITORING_DIR])
    )
    on_disk = {path.resolve() for path in KUBERNETES_DIR.rglob("*") if path.is_file()}
    assert on_disk == used


def test_probes_ports_and_metrics_agree_with_the_image(overlay):
    _, resources = overlay
    pod = deployment(resources)["spec"]["template"]
    container = serving_container(resources)
    (port,) = container["ports"]
    exposed = containerfile_instruction("EXPOSE").split()
    assert exposed == [str(port["containerPort"])]
    for probe, path in PROBE_PATHS.items():
        assert container[probe]["httpGet"] == {"path": path, "port": port["name"]}
    # The image's own health check asks the same question as the readiness probe.
    assert "/readyz" in containerfile_instruction("HEALTHCHECK")
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    service = find(resources, "Service", "digit-sentiment-serving")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port["name"]]
    # Runs as the image's user.
    user = containerfile_instruction("USER").split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)


def test_the_api_keys_come_from_the_secret_the_image_expects(overlay):
    _, resources = overlay
    pod = deployment(resources)["spec"]["template"]["spec"]
    container = serving_container(resources)
    path = check_keys_from_the_secret(pod, container, settings_env(resources))
    assert path.startswith("/run/secrets/")


def test_the_probes_and_the_image_health_check_need_no_key(overlay):
    _, resources = overlay
    check_probes_need_no_key(serving_container(resources))
    health_check = containerfile_instruction("HEALTHCHECK")
    asked = re.findall(r"http://[^/'\"]+(/[^'\"]*)", health_check)
    assert asked and set(asked) <= OPEN_PATHS, asked


def test_the_key_checks_catch_a_manifest_that_serves_open_or_stale(overlay):
    """Each way of getting the keys wrong fails the checks above."""
    _, resources = overlay
    pod = deployment(resources)["spec"]["template"]["spec"]
    container = serving_container(resources)
    configmaps = settings_env(resources)

    def broken(change) -> tuple[dict[str, Any], dict[str, Any]]:
        pod_copy, container_copy = copy.deepcopy(pod), copy.deepcopy(container)
        change(pod_copy, container_copy)
        return pod_copy, container_copy

    def volume(pod: dict[str, Any]) -> dict[str, Any]:
        (mount,) = container["volumeMounts"]
        return next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]

    mount_path = container["volumeMounts"][0]["mountPath"]
    wrong = {
        "subPath": lambda p, c: c["volumeMounts"][0].update(
            mountPath=image_keys_file(), subPath=KEYS_SECRET_KEY
        ),
        "writable": lambda p, c: c["volumeMounts"][0].update(readOnly=False),
        "optional": lambda p, c: volume(p).update(optional=True),
        "other Secret": lambda p, c: volume(p).update(secretName="other"),
        "other key": lambda p, c: volume(p).update(items=[{"key": "keys", "path": "api-keys"}]),
        "no mount": lambda p, c: c.pop("volumeMounts"),
        "outside the mount": lambda p, c: c["env"].append(
            {"name": KEYS_VARIABLE, "value": "/etc/api-keys"}
        ),
        "keys off": lambda p, c: c["env"].append({"name": KEYS_VARIABLE, "value": ""}),
        # In the mount, but not the file the image and the documents name.
        "another file": lambda p, c: c["env"].append(
            {"name": KEYS_VARIABLE, "value": f"{mount_path}/{KEYS_SECRET_KEY}-2"}
        ),
        "unreadable": lambda p, c: (
            p["securityContext"].pop("fsGroup", None),
            volume(p).update(defaultMode=0o440),
        ),
    }
    for what, change in wrong.items():
        with pytest.raises(AssertionError):
            check_keys_from_the_secret(*broken(change), configmaps)
            pytest.fail(f"not caught: {what}")  # reached only when the check passed
    closed = copy.deepcopy(container)
    closed["livenessProbe"]["httpGet"]["path"] = METRICS_PATH
    with pytest.raises(AssertionError):
        check_probes_need_no_key(closed)


def test_the_documented_pod_monitor_scrapes_with_a_key(overlay):
    """docs/deploy.md's PodMonitor (the Prometheus operator's, not validated here: a
    custom resource) picks these pods, asks /metrics on the annotated port and sends
    a bearer key from a Secret of its own, not the key file (which holds only hashes)."""
    _, resources = overlay
    spec = documented_pod_monitor()["spec"]
    template = deployment(resources)["spec"]["template"]
    assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = spec["podMetricsEndpoints"]
    (port,) = serving_container(resources)["ports"]
    assert endpoint["port"] == port["name"]
    assert (
        endpoint["path"]
        == METRICS_PATH
        == template["metadata"]["annotations"]["prometheus.io/path"]
    )
    authorization = endpoint["authorization"]
    assert authorization["type"] == "Bearer"
    assert set(authorization["credentials"]) == {"name", "key"}
    assert authorization["credentials"]["name"] != KEYS_SECRET


def documented_pod_monitor() -> dict[str, Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), flags=re.DOTALL)
    documents = [yaml.safe_load(block) for block in blocks]
    monitors = [d for d in documents if isinstance(d, dict) and d.get("kind") == "PodMonitor"]
    assert len(monitors) == 1, "docs/deploy.md shows one PodMonitor"
    return monitors[0]


def test_the_monitoring_component_holds_the_documented_pod_monitor():
    """The optional component is a kustomize Component (an overlay lists it under
    ``components:``) with docs/deploy.md's PodMonitor, which the test above checks
    against the pods, plus a scrape interval; tests/test_observability.py checks its
    PrometheusRule against deploy/observability/rules.yaml."""
    kustomization = yaml.safe_load((MONITORING_DIR / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert kustomization["kind"] == "Component"
    resources = render(MONITORING_DIR)
    assert sorted(r["kind"] for r in resources) == ["PodMonitor", "PrometheusRule"]
    monitor = copy.deepcopy(find(resources, "PodMonitor", "digit-sentiment-serving"))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint.pop("interval") == "15s"
    assert monitor == documented_pod_monitor()


def test_selectors_pick_the_deployments_pods(overlay):
    _, resources = overlay
    pod_labels = deployment(resources)["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment(resources)["spec"]["selector"]["matchLabels"],
        "Service": find(resources, "Service", "digit-sentiment-serving")["spec"]["selector"],
        "PodDisruptionBudget": find(resources, "PodDisruptionBudget", "digit-sentiment-serving")[
            "spec"
        ]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), kind
    hpa = find(resources, "HorizontalPodAutoscaler", "digit-sentiment-serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment(resources)["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2  # the disruption budget needs a second replica


def test_the_image_is_the_one_make_container_tags(overlay):
    variant, resources = overlay
    env_sh = (CONTAINER_DIR / "env.sh").read_text()
    image = re.search(r"^IMAGE=\$\{IMAGE:-([^}]+)\}", env_sh, flags=re.MULTILINE).group(1)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(rf"^IMAGE \?= {re.escape(image)}$", makefile, flags=re.MULTILINE)
    assert serving_container(resources)["image"] == f"{image}:{variant}"
    build_sh = (CONTAINER_DIR / "build.sh").read_text()
    assert re.search(rf"^\s+{variant}\) bentofile=", build_sh, flags=re.MULTILINE)
    assert '-t "localhost/$IMAGE:$variant"' in build_sh


def test_the_settings_are_ones_the_service_reads_and_accepts(overlay):
    variant, resources = overlay
    env = settings_env(resources)
    assert env and all(name.startswith(PREFIX) for name in env)
    recording = RecordingEnv(env)
    settings = Settings.from_env(recording)  # raises SettingsError on a bad value
    assert set(env) <= recording.read, set(env) - recording.read
    assert settings.device == variant.replace("gpu", "cuda")


def test_the_grace_period_covers_the_prestop_delay_and_the_drain(overlay):
    _, resources = overlay
    pod = deployment(resources)["spec"]["template"]["spec"]
    settings = Settings.from_env(settings_env(resources))
    command = serving_container(resources)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    # The drain ends SERVING_DRAIN_S after the signal; the workers then need a moment to exit.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + settings.connections.drain_s + 5
    assert pre_stop_s >= 2  # endpoints and proxies need time to stop routing here


def test_resources_fit_the_service_on_its_node(overlay):
    variant, resources = overlay
    container = serving_container(resources)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    settings = Settings.from_env(settings_env(resources))
    # In a container os.cpu_count() is the node's: the threads must be set, within the limit.
    assert settings.threads is not None
    assert settings.threads * settings.workers <= cpu_cores(limits["cpu"])
    assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"])
    pod = deployment(resources)["spec"]["template"]["spec"]
    if variant == "gpu":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] or pod["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in limits
        assert "nodeSelector" not in pod and "tolerations" not in pod


def test_the_commented_autoscaling_alternative_is_a_valid_metrics_block(overlay):
    _, resources = overlay
    hpa = find(resources, "HorizontalPodAutoscaler", "digit-sentiment-serving")
    alternative = commented_alternative(KUBERNETES_DIR / "base" / "hpa.yaml", "replace `metrics:`")
    assert alternative["metrics"][0]["pods"]["metric"]["name"] == in_flight_metric()
    swapped = {**hpa, "spec": {**hpa["spec"], "metrics": alternative["metrics"]}}
    kubernetes_validate.validate(swapped, KUBERNETES_VERSIONS[-1], strict=True)


def in_flight_metric() -> str:
    """The metric the commented HPA alternative scales on (served on /metrics by BentoML;
    tests/test_container.py checks that the image serves it)."""
    return "bentoml_service_request_in_progress"


def test_the_env_files_hold_only_serving_settings():
    for path in KUBERNETES_DIR.rglob("*.env"):
        assert all(name.startswith(PREFIX) for name in read_env_file(path)), path


def test_the_cpu_bentofile_differs_from_the_standard_one_only_in_its_packages():
    import yaml

    standard = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    cpu = yaml.safe_load((REPO_ROOT / "deploy" / "bentofile-cpu.yaml").read_text())
    packages = {"standard": standard["python"].pop("packages")}
    packages["cpu"] = cpu["python"].pop("packages")
    for bentofile in (standard, cpu):
        for key in ("name", "description"):
            bentofile.pop(key)
    assert cpu == standard
    pins = {variant: dict(p.split("==") for p in listed) for variant, listed in packages.items()}
    assert "torch" not in pins["cpu"] and "onnxruntime-gpu" not in pins["cpu"]
    assert pins["cpu"].pop("onnxruntime") == pins["standard"].pop("onnxruntime-gpu")
    pins["standard"].pop("torch")
    assert pins["cpu"] == pins["standard"]


# Run by the KServe SDK's Python: a JSON list of manifests on stdin → for each, the SDK's
# V1beta1InferenceService built from it, field by field (a wrong type or a field the
# model does not have is an error), what it holds, and the manifest it stands for.
KSERVE_SDK_READ = r"""
import datetime, json, re, sys
import kserve, kubernetes.client

PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool, "object": object,
              "datetime": (str, datetime.datetime)}

def build(data, kind, where):
    if data is None:
        return None
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", kind):
        if not isinstance(data, list):
            raise TypeError(f"{where}: not a list")
        return [build(item, match[1], f"{where}[{i}]") for i, item in enumerate(data)]
    if match := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", kind):
        if not isinstance(data, dict):
            raise TypeError(f"{where}: not a mapping")
        return {k: build(v, match[1] or match[2], f"{where}.{k}") for k, v in data.items()}
    if kind in PRIMITIVES:
        if not isinstance(data, PRIMITIVES[kind]) or (
                isinstance(data, bool) and kind not in ("bool", "object")):
            raise TypeError(f"{where}: {data!r} is not {kind}")
        return data
    # The SDK's own models, and the Kubernetes client's that they name (V1Container, ...).
    model = getattr(kserve.models, kind, None) or getattr(kubernetes.client, kind)
    if not isinstance(data, dict):
        raise TypeError(f"{where}: not a {kind}")
    unknown = set(data) - set(model.attribute_map.values())
    if unknown:
        raise ValueError(f"{where}: {kind} has no field {', '.join(sorted(unknown))}")
    return model(**{attribute: build(data[key], model.openapi_types[attribute], f"{where}.{key}")
                    for attribute, key in model.attribute_map.items() if key in data})

def plain(value):
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if hasattr(type(value), "attribute_map"):
        return {key: plain(getattr(value, attribute))
                for attribute, key in value.attribute_map.items()
                if getattr(value, attribute) is not None}
    return value

results = []
for manifest in json.load(sys.stdin):
    try:
        service = build(manifest, "V1beta1InferenceService", manifest.get("kind"))
    except (TypeError, ValueError) as error:
        results.append({"error": f"{type(error).__name__}: {error}"})
        continue
    predictor = service.spec.predictor
    container = predictor.containers[0]
    results.append({
        "types": [type(o).__name__ for o in (service, predictor, container, container.ports[0])],
        "image": container.image,
        "ports": [[p.name, p.container_port, p.protocol] for p in container.ports],
        "protocol": {variable.name: variable.value for variable in container.env}.get("PROTOCOL"),
        "readiness": container.readiness_probe.http_get.path,
        "liveness": container.liveness_probe.http_get.path,
        "manifest": plain(service),
    })
json.dump(results, sys.stdout)
"""


def read_with_the_kserve_sdk(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    python = tool_python("KSERVE_VENV", ".venv-kserve", "kserve-venv")
    done = subprocess.run(
        [str(python), "-c", KSERVE_SDK_READ],
        input=json.dumps(manifests),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def kserve_resources() -> list[dict[str, Any]]:
    return render(KSERVE_DIR)


def inference_service(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return find(resources, "InferenceService", "digit-sentiment-serving")


def predictor_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = inference_service(resources)["spec"]["predictor"]["containers"]
    return container


def made_image() -> str:
    """The image ``make container VARIANT=cpu`` tags (deploy/container/build.sh)."""
    env_sh = (CONTAINER_DIR / "env.sh").read_text()
    image = re.search(r"^IMAGE=\$\{IMAGE:-([^}]+)\}", env_sh, flags=re.MULTILINE).group(1)
    assert '-t "localhost/$IMAGE:$variant"' in (CONTAINER_DIR / "build.sh").read_text()
    return f"localhost/{image}:cpu"


def test_the_kserve_sdk_reads_the_inference_service(kserve_resources):
    manifest = inference_service(kserve_resources)
    # protocolVersion is no field of a custom predictor: the SDK has no place for it.
    misplaced = copy.deepcopy(manifest)
    misplaced["spec"]["predictor"]["protocolVersion"] = "v2"
    mistyped = copy.deepcopy(manifest)
    mistyped["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "3000"
    read, misplaced, mistyped = read_with_the_kserve_sdk([manifest, misplaced, mistyped])
    assert "error" not in read, read
    # Everything in the manifest has its place in the SDK's models, with its type.
    assert read.pop("manifest") == manifest
    assert read == {
        "types": ["V1beta1InferenceService", "V1beta1PredictorSpec", "V1Container",
                  "V1ContainerPort"],
        "image": made_image(),
        "ports": [["http1", int(containerfile_instruction("EXPOSE")), "TCP"]],
        "protocol": "v2",
        "readiness": "/v2/health/ready",
        "liveness": "/v2/health/live",
    }  # fmt: skip
    assert "V1beta1PredictorSpec has no field protocolVersion" in misplaced["error"]
    assert "'3000' is not int" in mistyped["error"]


def test_the_kserve_predictor_and_its_settings_validate_as_kubernetes_objects(kserve_resources):
    predictor = inference_service(kserve_resources)["spec"]["predictor"]
    # A custom predictor is a pod spec with KServe's fields beside it.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {"containers": predictor["containers"], "volumes": predictor["volumes"]},
    }
    [settings] = [r for r in kserve_resources if r["kind"] == "ConfigMap"]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
        kubernetes_validate.validate(settings, version, strict=True)


def test_the_kserve_predictor_serves_as_the_cpu_overlay_does(kserve_resources):
    container = predictor_container(kserve_resources)
    cpu = render(OVERLAYS["cpu"])
    (source,) = container["envFrom"]
    env = find(kserve_resources, "ConfigMap", source["configMapRef"]["name"])["data"]
    assert env == settings_env(cpu)
    recording = RecordingEnv(env)
    settings = Settings.from_env(recording)
    assert set(env) <= recording.read and settings.device == "cpu"
    assert container["resources"] == serving_container(cpu)["resources"]
    assert settings.threads * settings.workers <= cpu_cores(container["resources"]["limits"]["cpu"])
    # Knative allows one port, named for its protocol; every probe asks that port.
    (port,) = container["ports"]
    assert port["containerPort"] == int(containerfile_instruction("EXPOSE"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"] == "http1"
    annotations = inference_service(kserve_resources)["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    user = containerfile_instruction("USER").split(":")[0]
    assert container["securityContext"]["runAsUser"] == int(user)


def test_the_kserve_predictor_reads_its_keys_from_the_secret(kserve_resources):
    predictor = inference_service(kserve_resources)["spec"]["predictor"]
    container = predictor_container(kserve_resources)
    (source,) = container["envFrom"]
    configmaps = find(kserve_resources, "ConfigMap", source["configMapRef"]["name"])["data"]
    # KServe's predictor spec is a pod spec: its volumes are the pod's.
    path = check_keys_from_the_secret(predictor, container, configmaps)
    cpu = render(OVERLAYS["cpu"])
    assert path == container_env(serving_container(cpu), settings_env(cpu))[KEYS_VARIABLE]
    check_probes_need_no_key(container)
